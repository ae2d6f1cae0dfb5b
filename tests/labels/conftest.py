"""Fixtures of the labels layer: the tiny teacher of the serving tests (one per session), and
in-process servers of it."""

from tests.serving.conftest import direct, server_factory, teacher_env

__all__ = ["direct", "server_factory", "teacher_env"]
