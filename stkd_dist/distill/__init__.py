"""Distillation: masked criteria, distillation losses and multi-teacher ensembles."""

from stkd_dist.distill.criteria import CRITERIA, Criterion, GaussianNLL, build_criterion
from stkd_dist.distill.ensemble import combine_teachers, teacher_weights
from stkd_dist.distill.losses import (
    LOSSES,
    SPEED_THRESHOLDS,
    HintonKD,
    RegressionKD,
    as_class_logits,
    build_loss,
    speed_to_classes,
)

__all__ = [
    "CRITERIA",
    "LOSSES",
    "SPEED_THRESHOLDS",
    "Criterion",
    "GaussianNLL",
    "HintonKD",
    "RegressionKD",
    "as_class_logits",
    "build_criterion",
    "build_loss",
    "combine_teachers",
    "speed_to_classes",
    "teacher_weights",
]
