"""The students' label wait with a teacher fleet of 1, 2 and autoscaled replicas, one run.

The real code path of ``stkd train-student --teacher ray:N`` (``train_student`` with started
replicas) trains the same 2-worker distilled ``mlp`` student three times on one local Ray
cluster: with a fixed fleet of 1 replica, a fixed fleet of 2, and a fleet autoscaled from the
students' label wait (``serve.autoscale``: min 1, max 2, target wait 0.3, a decision every
second, no removals). The teacher is deliberately slow (an untrained wide LSTM, ``--hidden``),
the replicas reserve no CPUs (they share the workers' cores), and nothing is kept between epochs
(no label cache, ``recent_bytes=0``): every epoch asks the teacher for every window again.

Per fleet, from the experiment's files: epoch time (``history.jsonl``'s ``epoch_time_s``, rank
0's; the first epoch and the mean of the later ones), the students' label-wait share of each
epoch (the ranks' ``wait_s`` in ``labels/epoch_NNNN/rank_R.json``, summed, over ranks x epoch
time), the replicas the ranks streamed from in each epoch (their endpoints), the wall time of
``train_student`` and, for the autoscaled fleet, the autoscaler's timeline (``label_use.json``).
The run replaces (or appends) the section of ``bench/RESULTS.md`` under the heading below;
``--no-write`` only prints.

Usage::

    .venv/bin/python -m bench.fleet_scaling                  # ~5-7 minutes on 2 cores
    .venv/bin/python -m bench.fleet_scaling --epochs 1 --no-write  # smoke: print only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import results

HEADING = "## Teacher fleet: students' label wait with 1, 2 and autoscaled replicas"
WORLD = 2
# the autoscaled fleet's policy (``serve.autoscale``): idle_s so long that it never shrinks here
AUTOSCALE = {"min": 1, "max": 2, "target_wait": 0.3, "interval_s": 1.0, "idle_s": 600.0}
# name, replicas to start, autoscaled
FLEETS = (("1 replica", 1, False), ("2 replicas", 2, False), ("autoscaled 1..2", 1, True))
CONFIG = """\
run: {{seed: 0, keep_best: 2}}
data:
  dataset: {dataset}
  input_steps: 12
  horizon: 12
  stride: 1
  split: {{train: 0.7, val: 0.1, test: 0.2}}
  batch_size: {batch_size}
  eval_batch_size: 64
student:
  model: mlp
  kwargs: {{embed_dim: 16, node_dim: 8, tod_dim: 4, dow_dim: 4, num_layers: 1}}
  optim: {{lr: 0.003, weight_decay: 0.0001, grad_clip: 5.0}}
  schedule: {{epochs: 1, warmup_epochs: 1, kind: cosine, min_lr: 0.0001}}
distill: {{loss: regression, alpha: 0.5, beta: 0.0, ensemble: mean}}
cluster: {{num_workers: {world}, cpus_per_worker: 1, torch_threads: 1, max_failures: 0}}
"""


def _say(msg: str) -> None:
    print(f"[fleet_scaling] {msg}", file=sys.stderr, flush=True)


def make_inputs(root: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """A random store, an untrained LSTM teacher of it and the student config; their paths."""
    from stkd_dist.testing import random_store, untrained_teacher

    store_path = random_store(root / "bench-fleet.zarr", steps=args.steps, nodes=args.nodes)
    info = untrained_teacher(root, store_path, "slow", seed=3, hidden=args.hidden)
    text = CONFIG.format(
        dataset=json.dumps(str(store_path)), batch_size=args.batch_size, world=WORLD
    )
    config = root / "student.yaml"
    config.write_text(text)
    return store_path, info.path, config


def measure(
    name: str, replicas: int, autoscaled: bool, inputs: tuple[Path, Path, Path], root: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """Train the student with one fleet; its epochs, label waits, replicas and timeline."""
    from stkd_dist.config import load_config
    from stkd_dist.config.pipeline import AutoscaleSection
    from stkd_dist.labels.replicas import ReplicaCompute
    from stkd_dist.labels.started import ReplicaPlan
    from stkd_dist.labels.teachers import TeacherSpec
    from stkd_dist.serving.client import ClientOptions
    from stkd_dist.serving.server import ServerConfig
    from stkd_dist.train.ray_session import read_history
    from stkd_dist.train.student import StudentRequest, train_student

    _, checkpoint, config = inputs
    run = f"fleet-{replicas}{'-auto' if autoscaled else ''}"
    cfg = load_config(config, [f"run.name={run}", f"student.schedule.epochs={args.epochs}"])
    plan = ReplicaPlan(
        config=ServerConfig(batch_size=32, recent_bytes=0),
        compute=ReplicaCompute(threads=1),
        num_cpus=0.0,
        secure=True,
        autoscale=AutoscaleSection(**AUTOSCALE) if autoscaled else None,
    )
    request = StudentRequest(
        teachers=(TeacherSpec("replicas", replicas=replicas),),
        checkpoint=str(checkpoint),
        client=ClientOptions(max_message_bytes=8192, prefetch=2),
        replicas=plan,
        write_through=False,
    )
    lines: list[tuple[float, str]] = []

    def echo(line: str) -> None:
        lines.append((time.time(), line))
        _say(f"{name}: {line}")

    t0 = time.perf_counter()
    out = train_student(cfg, request, storage=root / "storage", echo=echo)
    wall = time.perf_counter() - t0
    exp = Path(str(out.experiment))
    history = read_history(exp)
    epochs = []
    for h in history:
        e = h["epoch"]
        recs = [
            json.loads((exp / "labels" / f"epoch_{e:04d}" / f"rank_{r}.json").read_text())
            for r in range(WORLD)
        ]
        teachers = [t for rec in recs for t in rec["teachers"]]
        wait = sum(float(t["wait_s"]) for t in teachers)
        # DDP runs in lockstep: the group waits for its slowest rank's labels, the other ranks
        # wait for it in the gradient all-reduce (not counted as label wait)
        slowest = max(sum(float(t["wait_s"]) for t in rec["teachers"]) for rec in recs)
        epochs.append(
            {
                "epoch": e,
                "time_s": h["epoch_time_s"],
                "end": h["time"],
                "wait_s": wait,
                "slowest_wait_s": slowest,
                "share": wait / (WORLD * h["epoch_time_s"]),
                "replicas_used": len({ep for t in teachers for ep in t["endpoints"]}),
                "delivered": sum(int(t["delivered"]) for t in teachers),
            }
        )
    use = json.loads((exp / "label_use.json").read_text())
    # the autoscaler starts just before the first echo line (the teachers resolved): its clock's
    # zero in wall time, to place its decisions among the epochs (which end at history's "time")
    zero = lines[0][0] if lines else time.time()
    timeline = [{**d, "when": _when(zero + d["t_s"], epochs)} for d in use["replicas_timeline"]]
    return {
        "name": name,
        "epochs": epochs,
        "wall_s": wall,
        "timeline": timeline,
        "computed": use["teacher_windows_computed"],
        "distinct": use["distinct_windows"],
        "streams": {r["name"]: r["streams_served"] for r in use["replicas"]},
    }


def _when(at: float, epochs: list[dict[str, Any]]) -> str:
    """Where wall time ``at`` falls among the epochs (each ends at ``end``, ``time_s`` long)."""
    for i, e in enumerate(epochs):
        if at < e["end"] - e["time_s"]:
            return f"before epoch {i + 1}" if i == 0 else f"between epochs {i} and {i + 1}"
        if at <= e["end"]:
            return f"in epoch {i + 1}"
    return f"after epoch {len(epochs)}"


def render(runs: list[dict[str, Any]], args: argparse.Namespace, load: tuple, command: str) -> str:
    """The markdown section for RESULTS.md."""

    def later(vals: list[float], fmt: str = "{:.2f}") -> str:
        return fmt.format(statistics.fmean(vals[1:])) if len(vals) > 1 else "-"

    policy = ", ".join(f"{k}: {v:g}" for k, v in AUTOSCALE.items())

    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, CPython {platform.python_version()}), one local Ray cluster of "
        f"{args.cpus} CPUs for all three fleets; load average (1 min) {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (other jobs share the cores, so absolute times are indicative).",
        "",
        "```bash",
        command,
        "```",
        "",
        f"A distilled `mlp` student, {WORLD} Ray Train workers (1 CPU, 1 torch thread each), "
        f"{args.epochs} epoch(s), batch {args.batch_size}, on a {args.steps} x {args.nodes} x 2 "
        f"random store ({runs[0]['distinct']:,} training windows an epoch). Teacher: an untrained "
        f"LSTM of hidden size {args.hidden}, served by started Ray-actor replicas (0 CPUs "
        "reserved, secured with a token and TLS, batches of 32), no label cache and "
        "`recent_bytes=0`: every epoch asks the teacher for every window. Autoscaled: "
        f"`serve.autoscale: {{{policy}}}`. Label-wait share = the ranks' label wait summed / "
        f"({WORLD} x epoch time).",
        "",
        "| fleet | epoch 1 (s) | later epochs, mean (s) | label-wait share per epoch "
        "| share, later epochs | slowest rank's label wait, later epochs (s) "
        "| replicas used per epoch | wall (s) |",
        "|:---|---:|---:|:---|---:|---:|:---|---:|",
    ]
    for r in runs:
        times = [e["time_s"] for e in r["epochs"]]
        shares = [e["share"] for e in r["epochs"]]
        lines.append(
            f"| {r['name']} | {times[0]:.2f} | {later(times)} | "
            + ", ".join(f"{100 * s:.0f} %" for s in shares)
            + f" | {later([100 * s for s in shares], '{:.0f} %')} | "
            + f"{later([e['slowest_wait_s'] for e in r['epochs']])} | "
            + ", ".join(str(e["replicas_used"]) for e in r["epochs"])
            + f" | {r['wall_s']:.1f} |"
        )
    lines.append("")
    auto = runs[-1]
    shown = [d for d in auto["timeline"] if d["action"] != "hold"]
    holds = len(auto["timeline"]) - len(shown)
    lines.append(
        "Autoscaler timeline (decisions other than `hold`; "
        f"{holds} holds left out; placed among the epochs by wall clock, the autoscaler's t = 0 "
        "taken as the first status line, a fraction of a second after it started):"
    )
    lines.append("")
    for d in shown:
        share = "-" if d["wait_share"] is None else f"{100 * d['wait_share']:.0f} %"
        lines.append(
            f"- t = {d['t_s']:.1f} s, {d['when']}: **{d['action']}** -> "
            f"{d['replicas']} replica(s), wait share {share} ({d['reason']})"
        )
    lines += [
        "",
        "Teacher windows computed (all replicas) / distinct windows x epochs: "
        + "; ".join(
            f"{r['name']} {r['computed']:,} / {r['distinct'] * len(r['epochs']):,}" for r in runs
        )
        + ". Streams served per replica: "
        + "; ".join(
            f"{r['name']} " + ", ".join(str(n) for n in r["streams"].values()) for r in runs
        )
        + ".",
        "",
        "Wall time includes starting the replicas and Ray Train's worker group (tens of seconds "
        "each). The replicas reserve no CPUs, so the two workers and the replicas share the "
        f"{os.cpu_count()} cores: a second replica adds teacher throughput only in the time the "
        "workers leave a core idle, not a core of its own.",
        "",
        "Reading the share: it is the students' own label wait over their step time (the "
        "autoscaler's signal). With one replica serving both ranks, a rank whose labels came "
        "first waits for the other in the gradient all-reduce, which is not label wait; with a "
        "replica per rank both wait for their own labels, so the share can rise while the epoch "
        "gets shorter. The epoch time and the slowest rank's wait are what the students lose.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fleet_scaling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=4, help="student epochs per fleet (default 4)")
    p.add_argument("--steps", type=int, default=800, help="time steps of the store (default 800)")
    p.add_argument("--nodes", type=int, default=6, help="nodes (default 6)")
    p.add_argument("--hidden", type=int, default=512, help="teacher LSTM width (default 512)")
    p.add_argument("--batch-size", type=int, default=16, help="student batch (default 16)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import ray
    import torch

    torch.set_num_threads(1)
    command = ".venv/bin/python -m bench.fleet_scaling" + (" " + shlex.join(argv) if argv else "")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stkd-bench-fleet-") as tmp:
        root = Path(tmp)
        _say(f"writing a {args.steps} x {args.nodes} store and an LSTM({args.hidden}) teacher")
        inputs = make_inputs(root, args)  # before Ray: the store is written with Dask's threads
        ray.init(num_cpus=args.cpus, include_dashboard=False)
        try:
            runs = []
            for name, replicas, autoscaled in FLEETS:
                runs.append(measure(name, replicas, autoscaled, inputs, root, args))
                _say(f"{name}: {runs[-1]['wall_s']:.1f} s")
        finally:
            ray.shutdown()
    text = render(runs, args, (load, os.getloadavg()[0]), command)
    print(text)
    if not args.no_write:
        results.write_section(HEADING, text)
        _say(f"wrote {HEADING!r} to {results.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
