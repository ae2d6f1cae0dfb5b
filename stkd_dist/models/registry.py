"""Model registries: teachers, students, and one lookup over both.

A network factory is a class (or function) taking ``dims: DataDims``, ``adjacency: np.ndarray | None``
and its own hyper-parameters as keyword arguments with defaults. Checkpoints store
``(key, kwargs, dims)``, so any rank, Ray actor or server rebuilds the architecture from the key alone.
A key names either a teacher or a student, never both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from stkd_dist.data.batch import DataDims
from stkd_dist.errors import ConfigError
from stkd_dist.registry import Registry

TEACHERS: Registry[nn.Module] = Registry("teacher model")
STUDENTS: Registry[nn.Module] = Registry("student model")


class ModelLookup:
    """Read-only lookup over :data:`TEACHERS` and :data:`STUDENTS`.

    Args:
        registries: the registries searched, each key expected in exactly one of them.
    """

    def __init__(self, *registries: Registry[nn.Module]) -> None:
        self._registries = registries
        self.kind = "model"

    def _owners(self, key: str) -> list[Registry[nn.Module]]:
        owners = [r for r in self._registries if key in r]
        if len(owners) > 1:
            names = " and ".join(r.kind for r in owners)
            raise ConfigError(f"key {key!r} is registered as both {names}", where="model")
        return owners

    def __contains__(self, key: str) -> bool:
        return bool(self._owners(key))

    def keys(self) -> list[str]:
        return sorted(key for reg in self._registries for key in list(reg.keys()))

    def registry_of(self, key: str) -> Registry[nn.Module]:
        """The registry holding ``key``; an unknown key raises :class:`ConfigError`."""
        owners = self._owners(key)
        if not owners:
            raise ConfigError(
                f"unknown model {key!r}; teachers: {', '.join(TEACHERS.keys())}; "
                f"students: {', '.join(STUDENTS.keys())}",
                where="model",
            )
        return owners[0]

    def role(self, key: str) -> str:
        """``"teacher"`` or ``"student"``."""
        return "teacher" if self.registry_of(key) is TEACHERS else "student"

    def get(self, key: str) -> Callable[..., nn.Module]:
        return self.registry_of(key).get(key)

    def build(self, key: str, **kwargs: Any) -> nn.Module:
        return self.registry_of(key).build(key, **kwargs)


MODELS = ModelLookup(TEACHERS, STUDENTS)


def build_network(
    key: str, dims: DataDims, adjacency: np.ndarray | None = None, /, **kwargs: Any
) -> nn.Module:
    """Build the network registered as ``key`` (teacher or student).

    Args:
        key: registry key, e.g. ``"stgnn"`` or ``"mlp"``.
        dims: sizes of the data the network is built for.
        adjacency: ``[node, node]`` dense adjacency; networks that ignore the graph accept it.
        **kwargs: the network's hyper-parameters; unknown ones raise :class:`ConfigError`.
    """
    for reserved in ("dims", "adjacency"):
        if reserved in kwargs:
            raise ConfigError(f"{reserved!r} is not a hyper-parameter", where=f"model.{key}")
    return MODELS.build(key, dims=dims, adjacency=adjacency, **kwargs)
