"""Distillation: masked criteria, distillation losses and multi-teacher ensembles.

Losses (``LOSSES``): ``regression``, ``teacher_bounded``, ``hint`` (forecasts) and ``hinton``
(congestion classes).
"""

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
from stkd_dist.distill.regression_kd import HintKD, TeacherBoundedKD

#: losses a student can be trained with from what teachers serve (forecasts in original units);
#: ``hint`` also needs the teacher's hidden states, which the service does not stream yet
FORECAST_LOSSES = ("regression", "teacher_bounded")

__all__ = [
    "CRITERIA",
    "FORECAST_LOSSES",
    "LOSSES",
    "SPEED_THRESHOLDS",
    "Criterion",
    "GaussianNLL",
    "HintKD",
    "HintonKD",
    "RegressionKD",
    "TeacherBoundedKD",
    "as_class_logits",
    "build_criterion",
    "build_loss",
    "combine_teachers",
    "speed_to_classes",
    "teacher_weights",
]
