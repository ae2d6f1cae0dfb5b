"""Synthetic traffic-network datasets for scale tests and the demo.

:class:`SynthSpec` says what to generate, :class:`TrafficModel` generates it block by block, and
:func:`synthesize` writes it as a canonical store (see :mod:`stkd_dist.storage`).
"""

from stkd_dist.synth.generator import BLOCK_STEPS, SUB_BLOCK, Events, TrafficModel
from stkd_dist.synth.graph import RoadGraph, component_labels, random_road_graph
from stkd_dist.synth.spec import CHANNEL_UNITS, GENERATOR_VERSION, SynthSpec
from stkd_dist.synth.writer import (
    SYNTH_ATTR,
    ensure_synthetic,
    store_chunks,
    synthesize,
    synthetic_array,
)

__all__ = [
    "BLOCK_STEPS",
    "CHANNEL_UNITS",
    "GENERATOR_VERSION",
    "SUB_BLOCK",
    "SYNTH_ATTR",
    "Events",
    "RoadGraph",
    "SynthSpec",
    "TrafficModel",
    "component_labels",
    "ensure_synthetic",
    "random_road_graph",
    "store_chunks",
    "synthesize",
    "synthetic_array",
]
