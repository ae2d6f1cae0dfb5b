"""Online distillation end to end, in real processes: a day is appended to a run's store while a
``stkd serve --follow`` server streams its teacher; ``stkd update`` publishes v2; the stream that
started on v1 finishes on v1, each window exactly once; the next stream gets v2; the student
after the update is evaluated on the newest test days next to the one before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stkd_dist.ingest import IngestOptions, ingest
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.client import SoftLabelClient
from stkd_dist.serving.client_options import LabelMismatchError
from stkd_dist.storage import open_store
from tests.pipeline.test_distill import stkd
from tests.pipeline.tiny_run import tiny_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEAD, DAY, NODES = 600, 288, 6  # two days and a bit, then one more day of 5-minute steps


def _series() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(HEAD + DAY)[:, None, None]
    base = 50 + 10 * np.sin(2 * np.pi * t / 288 + rng.uniform(0, 6, size=(1, NODES, 1)))
    return (base + rng.normal(0, 1, size=base.shape)).astype(np.float32)


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.long  # about three minutes: a distill run, a following server, an update
def test_an_update_publishes_v2_while_a_v1_stream_finishes_on_v1(tmp_path: Path) -> None:
    x = _series()
    np.save(tmp_path / "head.npy", x[:HEAD])
    np.save(tmp_path / "day.npy", x[HEAD:])
    store = tmp_path / "net.zarr"
    ingest(IngestOptions(source=tmp_path / "head.npy", out=store, channels=("speed",),
                         start="2024-01-01 00:00", chunk_steps=64))  # fmt: skip
    config = tiny_run_config(
        tmp_path / "online.yaml",
        store,
        update={"days": 1, "teacher_epochs": 1, "student_epochs": 1},
    )
    storage = tmp_path / "storage"
    out = stkd(storage, "distill", "--config", str(config), "--run-name", "online", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = storage / "runs" / "online"
    v1 = json.loads((run / "stages.json").read_text())["stages"]["teacher"]["info"]["version"]
    fp1 = open_store(store).fingerprint
    # nothing appended yet: refused, and nothing written
    early = stkd(storage, "update", "online")
    assert early.returncode != 0
    assert "holds nothing the teacher has not seen" in early.stderr
    assert not (run / "updates.json").exists() and not (run / "published.json").exists()

    ready = tmp_path / "ready.json"
    env = {**os.environ, "STKD_STORAGE": str(storage)}
    server = subprocess.Popen(
        [sys.executable, "-m", "stkd_dist.cli", "serve", "--follow", "online", "--data",
         str(store), "--port", "0", "--ready-file", str(ready), "--follow-interval", "0.2"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address = _wait_for("the server", lambda: ready.exists() and json.loads(ready.read_text()))
        address = address["address"]
        # a long v1 stream (every training window, 40 times): it is in flight across the update
        old = SoftLabelClient(address, expected_fingerprint=fp1, prefetch=1)
        train = old.describe().splits
        windows = next(range(s.start, s.stop, s.step) for s in train if s.split == "train")
        asked = np.tile(np.asarray(windows), 40)
        stream = old.stream("train", asked)
        chunks = iter(stream)
        got = [next(chunks)[0]]
        assert old.version == v1

        grow = stkd(storage, "ingest", str(tmp_path / "day.npy"), "--append", "--out", str(store),
                    "--channels", "speed")  # fmt: skip
        assert grow.returncode == 0, grow.stderr[-3000:]
        fp2 = open_store(store).fingerprint
        assert fp2 != fp1
        up = stkd(storage, "update", "online", timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        v2 = json.loads((run / "published.json").read_text())["version"]
        assert v2 != v1

        # the server loads v2: a client of the grown store is answered by it
        def serves_v2() -> bool:
            try:
                return SoftLabelClient(address, expected_fingerprint=fp2).describe() is not None
            except LabelMismatchError:
                return False

        _wait_for("v2 on the server", serves_v2)
        before = sum(len(i) for i in got)
        assert before < len(asked)  # the stream was still in flight when v2 came
        # the v1 stream runs to its end on v1: every window it asked for, once, in order
        got += [indices for indices, _ in chunks]
        np.testing.assert_array_equal(np.concatenate(got), asked)
        assert old.version == v1 and old.stats.windows == len(asked)
        stream.close()

        # the next stream of the grown store gets v2 (its training windows: the recent day)
        new = SoftLabelClient(address, expected_fingerprint=fp2)
        split = next(s for s in new.describe().splits if s.split == "train")
        recent = np.arange(split.start, split.stop, split.step)
        with new.stream("train", recent) as s2:
            seen = np.concatenate([i for i, _ in s2])
        assert new.version == v2 and np.array_equal(seen, recent)
        assert recent[0] > windows.start  # only the last day's windows
    finally:
        server.terminate()
        server.wait(timeout=60)

    # v2's labels of the recent windows were computed once, into the run's cache
    stages = json.loads((run / "stages.json").read_text())["stages"]
    cache = LabelCache(run / stages["update1_labels"]["info"]["path"])
    assert cache.version == v2 and cache.forward_windows == len(recent)
    # the student before and after, on the whole test split and on its newest day
    ev = json.loads((run / "updates" / "update1.json").read_text())
    for part in ("test", "newest"):
        assert set(ev[part]) >= {"student_before", "student_after", "teacher_before",
                                 "teacher_after", "last_value", "historical_average"}  # fmt: skip
        assert all(v > 0 for v in ev[part].values())
    assert 0 < ev["windows"]["newest"] < ev["windows"]["test"]
    student = stages["update1_student"]["info"]["version"]
    assert ev["versions"]["student_after"] == student
    teachers = json.loads((run / "student_update1" / "teachers.json").read_text())["teachers"]
    assert [t["version"] for t in teachers] == [v2]

    # the same store again: nothing new is done
    again = stkd(storage, "update", "online")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "update1_teacher (skipped: already complete)" in again.stdout
