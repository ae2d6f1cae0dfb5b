"""Fixtures of the labels layer: the tiny teacher of the serving tests (one per session)."""

from tests.serving.conftest import direct, teacher_env

__all__ = ["direct", "teacher_env"]
