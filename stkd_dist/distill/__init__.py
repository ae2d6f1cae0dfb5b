"""Distillation: masked criteria, distillation losses and multi-teacher ensembles.

Losses (``LOSSES``): ``regression``, ``teacher_bounded`` (forecasts), ``hint`` (forecasts and the
teacher's hidden states) and ``hinton`` (congestion classes).
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

#: losses a student can be trained with from the teachers' forecasts alone (original units)
FORECAST_LOSSES = ("regression", "teacher_bounded")
#: losses that also distil the teacher's hidden states (streamed as the HIDDEN output, or read
#: from a label cache made with them); they train a projection with the student
HIDDEN_LOSSES = ("hint",)

__all__ = [
    "CRITERIA",
    "FORECAST_LOSSES",
    "HIDDEN_LOSSES",
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
