"""Forecasting networks: registries, the :class:`Forecaster` wrapper and the built-in models.

Importing this package registers every built-in model:

* teachers: ``lstm`` (per-node encoder–decoder LSTM), ``stgnn`` (Graph WaveNet),
  ``stgnn_inductive`` (Graph WaveNet without per-node parameters: transferable to another
  graph), ``staeformer`` (STAEformer);
* students: ``mlp`` (STID), ``lstm_small`` (small per-node LSTM), ``linear`` (per-node linear map).
"""

from stkd_dist.models import linear, lstm, mlp, staeformer, stgnn  # noqa: F401  (registers the models)
from stkd_dist.models.base import (
    Forecast,
    Forecaster,
    NetOutput,
    Network,
    build_forecaster,
)
from stkd_dist.models.registry import MODELS, STUDENTS, TEACHERS, build_network

__all__ = [
    "MODELS",
    "STUDENTS",
    "TEACHERS",
    "Forecast",
    "Forecaster",
    "NetOutput",
    "Network",
    "build_forecaster",
    "build_network",
]
