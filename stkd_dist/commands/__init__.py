"""One module per ``stkd`` subcommand; each exposes ``register(subparsers)``.

A module adds its parser with ``set_defaults(func=run)`` where ``run(args) -> int`` returns the exit
status. Keep argument parsing here and the work in the library modules.

``SUMMARIES`` is the one-line help of every command, in the order of ``stkd --help`` (the data plane
first, then training, serving, operations). It lives here, apart from the modules, so that the CLI
can list every command while importing only the module of the command it runs: several modules
import torch, Ray or Dask, which take seconds to load.
"""

SUMMARIES: dict[str, str] = {
    "ingest": "convert a CSV / .npy / .npz / HDF5 / Zarr dataset into a store",
    "info": "shape, time range, missing data, statistics, graph and fingerprint of a store",
    "synth": "generate a synthetic traffic-network dataset (any size)",
    "plan": "show the shard plan: the windows each data-parallel rank reads, in order",
    "config": "list presets, show a resolved config, validate a config file",
    "train-teacher": "train a teacher with data-parallel workers on Ray Train",
    "train-student": "distil a student from teacher soft labels with data-parallel workers",
    "evaluate": "metrics of a checkpoint and of the baselines on a split",
    "precompute-labels": "store a teacher's soft labels for every window (label cache)",
    "serve": "serve a teacher's soft labels to student workers (gRPC)",
    "distill": "one command: teacher, distilled + baseline students, evaluation and report",
    "update": "fine-tune a run's teacher and student on data appended to its store (online)",
    "sweep": "Ray Tune sweep of student/distillation settings (ASHA or PBT) over one teacher",
    "demo": "the whole pipeline on an embedded default dataset, in a few minutes",
    "submit": "run a stkd command as a job on a Ray cluster",
    "jobs": "list the jobs of a Ray cluster",
    "logs": "print or follow a job's output",
    "stop": "stop a job on a Ray cluster",
    "cluster": "start/stop a local multi-node Ray cluster; probe a cluster's nodes",
}
