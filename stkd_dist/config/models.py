"""Config sections of what is trained: ``teacher``, ``student`` and ``distill``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from stkd_dist.config.sections import non_negative, positive, require

ScheduleKind = Literal["cosine", "step", "constant"]
EnsembleKind = Literal["mean", "inverse_error"]


@dataclass(frozen=True)
class OptimSection:
    """``<role>.optim``: AdamW settings.

    Attributes:
        lr: peak learning rate (reached after warm-up).
        weight_decay: decoupled weight decay.
        betas: Adam's ``(beta1, beta2)``.
        grad_clip: maximum global gradient norm; 0 turns clipping off.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 5.0

    def __post_init__(self) -> None:
        positive(self, "lr")
        non_negative(self, "weight_decay", "grad_clip")
        require(
            all(0.0 <= b < 1.0 for b in self.betas),
            "betas",
            f"both betas must be in [0, 1), got {list(self.betas)}",
        )


@dataclass(frozen=True)
class ScheduleSection:
    """``<role>.schedule``: epochs and learning-rate schedule.

    The learning rate rises linearly over ``warmup_epochs`` epochs, then follows ``kind``:
    ``cosine`` (from ``lr`` down to ``min_lr`` at the end), ``step`` (times ``gamma`` every
    ``step_size`` epochs) or ``constant``. See :mod:`stkd_dist.train.schedule`.

    Attributes:
        epochs: passes over the training split.
        warmup_epochs: epochs of linear warm-up.
        kind: schedule after warm-up.
        step_size, gamma: step schedule.
        min_lr: floor of the cosine schedule.
        early_stopping_patience: stop after this many epochs without a better validation MAE
            (0 = never stop early).
        min_epochs: never stop early before this many epochs (a short warm-up phase or a noisy
            validation split would otherwise end training before it got going).
    """

    epochs: int = 10
    warmup_epochs: int = 1
    kind: ScheduleKind = "cosine"
    step_size: int = 10
    gamma: float = 0.5
    min_lr: float = 0.0
    early_stopping_patience: int = 0
    min_epochs: int = 0

    def __post_init__(self) -> None:
        positive(self, "epochs", "step_size", "gamma")
        # warmup_epochs >= epochs is allowed: the whole (short) run then warms up
        non_negative(self, "warmup_epochs", "min_lr", "early_stopping_patience", "min_epochs")

    def patience_at(self, epoch: int) -> int:
        """The early-stopping patience in force after 0-based ``epoch`` (0 before ``min_epochs``)."""
        return self.early_stopping_patience if epoch + 1 >= self.min_epochs else 0


@dataclass(frozen=True)
class ModelSection:
    """``teacher`` / ``student``: which model, with which arguments, trained how.

    Attributes:
        model: registry key of the model (``stkd models`` lists them).
        kwargs: the model's constructor arguments (checked against the model when validated).
        optim: optimiser settings.
        schedule: epochs and learning-rate schedule.
    """

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)

    def __post_init__(self) -> None:
        require(bool(self.model), "model", "must name a model")


@dataclass(frozen=True)
class TeacherSection(ModelSection):
    """``teacher``: a :class:`ModelSection` whose model defaults to the ``stgnn`` teacher.

    Attributes:
        dataset: train the teacher on this dataset (store path or name) instead of
            ``data.dataset``, then transfer it to ``data.dataset`` (transfer distillation: the
            model must be transferable, e.g. ``stgnn_inductive``); None: ``data.dataset``.
    """

    model: str = "stgnn"
    dataset: str | None = None


@dataclass(frozen=True)
class StudentSection(ModelSection):
    """``student``: a :class:`ModelSection` whose model defaults to the ``mlp`` student."""

    model: str = "mlp"


#: ``distill`` fields that only some losses take: null means "the loss's own default", and a
#: value set for a loss that does not take it is a config error (see :mod:`.validate`)
LOSS_PARAMETERS = ("beta", "temperature", "match", "margin", "huber_delta")


@dataclass(frozen=True)
class DistillSection:
    """``distill``: how a student learns from its teacher(s).

    ``loss``, ``alpha`` and ``task`` apply to every loss (``task`` is also the baseline student's
    criterion); the other fields are parameters of particular losses (the loss's constructor
    signature in :mod:`stkd_dist.distill` is their type): leave them null for the loss's default.
    Setting one the chosen loss does not take (``temperature`` with ``regression``) is an error.

    Attributes:
        loss: key of the distillation loss registry (``regression``, ``teacher_bounded``,
            ``hint``, ``hinton``).
        alpha: weight of the ground-truth (task) term, in [0, 1]; the teacher term gets
            ``1 - alpha``.
        task: masked criterion of the ground-truth term (``mae``, ``mse``, ``huber``).
        beta: weight of the extra term: feature / sequence-shape (``regression``), hint
            (``hint``).
        temperature: softening temperature (``hinton``).
        match: criterion of the teacher-matching term (``regression``, ``teacher_bounded``,
            ``hint``).
        margin: how much closer to the truth the teacher must be before it pulls the student
            (``teacher_bounded``, target units).
        huber_delta: ``δ`` of a ``huber`` criterion (``regression``, ``teacher_bounded``,
            ``hint``).
        confidence_weighting: weight soft labels by the teacher's confidence (``regression``).
        ensemble: how several teachers' labels combine: ``mean`` or ``inverse_error`` (weights
            inversely proportional to each teacher's validation error).
        rounds: rounds of ``stkd distill``: round 1 is the teacher and its distilled student;
            each further round fine-tunes the previous round's teacher on the targets and that
            round's student's predictions, then distils a new student from it.
        feedback: in those fine-tunings, the weight of the student's predictions, in (0, 1]
            (the targets get ``1 - feedback``).
        feedback_epochs: epochs of each fine-tuning (from the previous teacher's best
            checkpoint, with a fresh optimiser and the ``teacher.schedule`` settings otherwise).
    """

    loss: str = "regression"
    alpha: float = 0.5
    task: str = "mae"
    beta: float | None = None
    temperature: float | None = None
    match: str | None = None
    margin: float | None = None
    huber_delta: float | None = None
    confidence_weighting: bool = False
    ensemble: EnsembleKind = "mean"
    rounds: int = 1
    feedback: float = 0.5
    feedback_epochs: int = 2

    def __post_init__(self) -> None:
        require(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha!r}")
        require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds!r}")
        require(0.0 < self.feedback <= 1.0, "feedback", f"must be in (0, 1], got {self.feedback!r}")
        require(
            self.feedback_epochs >= 1,
            "feedback_epochs",
            f"must be >= 1, got {self.feedback_epochs!r}",
        )
        for name in ("beta", "margin"):
            value = getattr(self, name)
            require(value is None or value >= 0, name, f"must be >= 0, got {value!r}")
        for name in ("temperature", "huber_delta"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be > 0, got {value!r}")
