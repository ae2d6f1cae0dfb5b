"""The whole configuration: one field per section.

Adding a section is one dataclass (in its own module) plus one line here; the loader, ``--set``
overrides, ``stkd config show`` and the dump written to a run directory pick it up from the
annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stkd_dist.config.models import DistillSection, ModelSection, StudentSection, TeacherSection
from stkd_dist.config.pipeline import EvaluateSection, ServeSection, UpdateSection
from stkd_dist.config.sections import (
    CheckpointSection,
    ClusterSection,
    DataSection,
    RunSection,
    StorageSection,
)
from stkd_dist.config.sweep import SweepSection, parse_space

ROLES = ("teacher", "student")


@dataclass(frozen=True)
class Config:
    """A validated, resolved configuration (what a run directory's ``config.yaml`` holds)."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    distill: DistillSection = field(default_factory=DistillSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    serve: ServeSection = field(default_factory=ServeSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    update: UpdateSection = field(default_factory=UpdateSection)
    storage: StorageSection = field(default_factory=StorageSection)

    def __post_init__(self) -> None:
        # the sweep's keys are keys of this class: checked here, where the whole schema is known
        parse_space(self.sweep.space, "sweep.space", schema=Config)

    def model(self, role: str) -> ModelSection:
        """The ``teacher`` or ``student`` section."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        return getattr(self, role)

    @property
    def run_name(self) -> str:
        """The run's name (always set on a loaded config)."""
        assert self.run.name is not None, "load_config fills run.name"
        return self.run.name
