"""Typed configuration: YAML files and built-in presets validated into frozen dataclasses.

    cfg = load_config("demo", overrides=["teacher.optim.lr=3e-4"])
    cfg.teacher.schedule.epochs, cfg.data.window(), cfg.cluster.num_workers

Library code takes these typed objects, never raw dicts. See :mod:`.loader` for presets and
overrides and :mod:`.validate` for the checks against the model and loss registries.
"""

from stkd_dist.config.base import from_mapping, to_mapping
from stkd_dist.config.loader import (
    apply_overrides,
    config_from_text,
    dump_config,
    load_config,
    preset_names,
    preset_text,
    read_config,
    write_config,
)
from stkd_dist.config.models import (
    DistillSection,
    ModelSection,
    OptimSection,
    ScheduleSection,
    StudentSection,
    TeacherSection,
)
from stkd_dist.config.schema import ROLES, Config
from stkd_dist.config.sections import (
    CheckpointSection,
    ClusterSection,
    DataSection,
    RunSection,
    SplitSection,
    WorkerRange,
)

__all__ = [
    "ROLES",
    "CheckpointSection",
    "ClusterSection",
    "Config",
    "DataSection",
    "DistillSection",
    "ModelSection",
    "OptimSection",
    "RunSection",
    "ScheduleSection",
    "SplitSection",
    "StudentSection",
    "TeacherSection",
    "WorkerRange",
    "apply_overrides",
    "config_from_text",
    "dump_config",
    "from_mapping",
    "load_config",
    "preset_names",
    "preset_text",
    "read_config",
    "to_mapping",
    "write_config",
]
