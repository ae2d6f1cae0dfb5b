"""Unit tests of the pipeline's own logic: stage bookkeeping and latency measurement."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stkd_dist.config import load_config, to_mapping
from stkd_dist.errors import ConfigError, StoreError
from stkd_dist.pipeline.evaluate_all import forecast_sensors, steps_per_day
from stkd_dist.pipeline.latency import measure_latency
from stkd_dist.pipeline.run import RunLayout, StageBook, config_digest
from stkd_dist.pipeline.stages import _read_ca
from stkd_dist.serving.certs import CertificateAuthority


@pytest.fixture
def layout(tmp_path: Path) -> RunLayout:
    root = tmp_path / "runs" / "r"
    root.mkdir(parents=True)
    return RunLayout(root)


def test_stage_is_skipped_only_with_same_key_and_outputs(layout: RunLayout) -> None:
    book = StageBook(layout)
    assert book.completed("teacher", "k1") is None
    assert book.why_redo("teacher", "k1") == "new"
    out = layout.experiment("teacher")
    out.mkdir()
    (out / "best.json").write_text("{}")
    book.record("teacher", "k1", [out / "best.json"], seconds=1.5, info={"version": "v1"})

    # a fresh book reads the same record back from stages.json
    again = StageBook(layout)
    rec = again.completed("teacher", "k1")
    assert rec is not None and rec.outputs == ("teacher/best.json",)
    assert rec.info == {"version": "v1"} and rec.seconds == 1.5
    # other inputs: redo
    assert again.completed("teacher", "k2") is None
    assert again.why_redo("teacher", "k2") == "inputs changed"
    # an output deleted: redo
    (out / "best.json").unlink()
    assert again.completed("teacher", "k1") is None
    assert again.why_redo("teacher", "k1").startswith("output missing: teacher/best.json")


def test_stages_json_is_replaced_atomically_and_forget(layout: RunLayout) -> None:
    book = StageBook(layout)
    (layout.root / "a.txt").write_text("x")
    book.record("a", "k", ["a.txt"], 0.1)
    book.record("b", "k", [], 0.2)
    data = json.loads(layout.stages.read_text())
    assert set(data["stages"]) == {"a", "b"} and data["format"] == 1
    # no temp files left next to it
    assert sorted(p.name for p in layout.root.iterdir()) == ["a.txt", "stages.json"]
    book.forget("a")
    assert set(StageBook(layout).records) == {"b"}


def test_damaged_stages_json_is_a_store_error(layout: RunLayout) -> None:
    layout.stages.write_text("{not json")
    with pytest.raises(StoreError, match="stage bookkeeping") as e:
        StageBook(layout)
    assert e.value.where == str(layout.stages)


def test_config_digest_depends_only_on_named_sections() -> None:
    cfg = load_config("demo")
    base = config_digest(cfg, ["data", "teacher"], fingerprint="f")
    bigger = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, num_workers=4))
    assert config_digest(bigger, ["data", "teacher"], fingerprint="f") == base
    lr = load_config("demo", ["teacher.optim.lr=0.01"])
    assert config_digest(lr, ["data", "teacher"], fingerprint="f") != base
    assert config_digest(lr, ["data", "student"], fingerprint="f") == config_digest(
        cfg, ["data", "student"], fingerprint="f"
    )
    assert config_digest(cfg, ["data", "teacher"], fingerprint="g") != base
    assert config_digest(cfg, ["run.seed"]) != config_digest(
        load_config("demo", ["run.seed=3"]), ["run.seed"]
    )


class FakeClock:
    """A clock each runner advances by its own cost, so timings are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_latency_median_per_model_interleaved_and_threads_restored() -> None:
    clock = FakeClock()
    order: list[str] = []
    # cost in seconds of each call of each model: a slow outlier for "a", warm-up calls slower
    costs = {"a": [9.0, 9.0, 0.010, 0.012, 0.500], "b": [9.0, 9.0, 0.002, 0.002, 0.003]}

    def runner(name: str):
        calls = iter(costs[name])

        def run() -> None:
            order.append(name)
            clock.now += next(calls)

        return run

    before = torch.get_num_threads()
    seen_threads: list[int] = []
    runners = {n: runner(n) for n in costs}
    wrapped = {
        n: (lambda f=f: (seen_threads.append(torch.get_num_threads()), f()))
        for n, f in runners.items()
    }
    res = measure_latency(wrapped, warmup=2, repeats=3, threads=1, timer=clock)
    assert torch.get_num_threads() == before
    assert set(seen_threads) == {1}
    # warm-up excluded; median of the three timed calls, in milliseconds
    assert res["a"].median_ms == pytest.approx(12.0)
    assert res["b"].median_ms == pytest.approx(2.0)
    assert len(res["a"].times_ms) == 3 and res["a"].threads == 1
    # warm-up of each, then rounds with a rotating order: ab, ba, ab
    assert order == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]


def test_latency_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError):
        measure_latency({}, repeats=1)
    with pytest.raises(ConfigError):
        measure_latency({"a": lambda: None}, repeats=0)


def test_forecast_sensors_and_steps_per_day() -> None:
    assert forecast_sensors(100, 4).tolist() == [0, 33, 66, 99]
    assert forecast_sensors(3, 10).tolist() == [0, 1, 2]
    assert steps_per_day("5min") == 288 and steps_per_day("1h") == 24
    assert np.all(np.diff(forecast_sensors(207, 6)) > 0)


class ZeroModel(torch.nn.Module):
    """Forecasts 0 everywhere; one parameter tensor of 3 values (counted, never used)."""

    def __init__(self, horizon: int, nodes: int, channels: int) -> None:
        super().__init__()
        self.shape = (horizon, nodes, channels)
        self.unused = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, tod: torch.Tensor, dow: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], *self.shape)


def test_evaluate_all_matches_a_direct_computation(make_store) -> None:  # type: ignore[no-untyped-def]
    from stkd_dist.config.pipeline import EvaluateSection
    from stkd_dist.data.reader import WindowReader
    from stkd_dist.data.windows import WindowSpec
    from stkd_dist.pipeline.evaluate_all import evaluate_all
    from stkd_dist.storage import open_store

    store = open_store(make_store("ev", steps=500, nodes=5, channels=2, missing=0.1))
    reader = WindowReader(store, window=WindowSpec(input_steps=4, horizon=3))
    section = EvaluateSection(
        latency_batch_size=8,
        latency_warmup=1,
        latency_repeats=2,
        forecast_sensors=2,
        forecast_step=2,
    )
    ev = evaluate_all(reader, {"zero": ZeroModel(3, 5, 2)}, section, batch_size=32)

    test = np.asarray(reader.windows("test"))
    batch = reader.batch(test)
    y, m = batch.y.double(), batch.mask  # [windows, H, node, C]
    assert ev.metrics["zero"].mae == pytest.approx(float(y[m].abs().mean()))
    per_node = [float(y[:, :, n][m[:, :, n]].abs().mean()) for n in range(5)]
    np.testing.assert_allclose(ev.node_mae["zero"], per_node, rtol=1e-9)
    assert set(ev.metrics) == {"zero", "last_value", "historical_average"}
    assert ev.params == {"zero": 3}
    assert set(ev.latency) == {"zero"} and ev.latency_batch_size == 8
    assert len(ev.latency["zero"].times_ms) == 2

    f = ev.forecasts
    assert f is not None
    sensors = [0, 4]
    assert f["node_ids"].tolist() == [store.node_ids[i] for i in sensors]
    n = len(f["time"])
    assert n == min(len(test), 288)  # one day of 5-min windows at most
    truth = np.where(m[:n, 1, sensors, 0], y[:n, 1, sensors, 0], np.nan)
    np.testing.assert_allclose(f["truth"], truth, rtol=1e-6)
    assert (f["pred_zero"] == 0).all()
    # the truth of window w at step 2 is the reading at w + L + 1
    assert f["time"][0] == np.datetime64(store.time[test[0] + 4 + 1])

    data = ev.to_json({"name": "ev"})
    assert data["zero"]["params"] == 3 and len(data["zero"]["mae_per_horizon"]) == 3
    assert "params" not in data["last_value"] and data["dataset"] == {"name": "ev"}
    json.dumps(data, allow_nan=False)  # no NaN: what metrics.json must hold

    with pytest.raises(ConfigError, match="horizon"):
        evaluate_all(reader, {}, dataclasses.replace(section, forecast_step=4), batch_size=32)


def test_distill_refuses_bad_endpoints_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stkd_dist.cli import main

    root = tmp_path / "storage"
    code = main(["--storage", str(root), "distill", "--config", "demo", "--teacher", "nohost"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("stkd: error: serve.endpoints (--teacher): expected HOST:PORT")
    assert not root.exists()  # nothing written, no dataset synthesised


def test_teacher_check_and_findings_in_metrics(layout: RunLayout) -> None:
    from stkd_dist.pipeline.findings import split_findings, teacher_check, write_findings

    ok = teacher_check(3.0, {"last_value": 3.5, "historical_average": 6.0})
    assert ok["beats_baselines"] and ok["beats"] == {
        "last_value": True,
        "historical_average": True,
    }
    bad = teacher_check(4.0, {"last_value": 3.5, "historical_average": 6.0})
    assert not bad["beats_baselines"]
    assert bad["message"].startswith("warning: the teacher (validation MAE 4) does not beat last")
    layout.metrics.write_text(json.dumps({"teacher": {"mae": 1.0}, "kd_vs_scratch": {"old": 1}}))
    write_findings(layout.metrics, {"teacher_check": bad})  # a stale kd_vs_scratch goes
    models, findings = split_findings(json.loads(layout.metrics.read_text()))
    assert models == {"teacher": {"mae": 1.0}} and list(findings) == ["teacher_check"]


def test_headroom_check_says_whether_the_teacher_knows_more_than_the_student() -> None:
    from stkd_dist.pipeline.findings import headroom_check

    ahead = headroom_check(3.0, 3.3)  # (3.3 - 3.0) / 3.3 = 9.1 %
    assert ahead["worth_distilling"] and ahead["relative_gap"] == pytest.approx(0.3 / 3.3)
    assert ahead["message"] == (
        "the teacher's validation MAE is 9.1 % below the scratch student's (teacher 3, scratch "
        "student 3.3): it knows more than the student learns alone"
    )
    close = headroom_check(3.25, 3.3)  # 1.5 %: under the 2 % threshold
    assert not close["worth_distilling"]
    assert close["message"].startswith(
        "warning: the teacher's validation MAE is only 1.5 % below the scratch student's "
        "(teacher 3.25, scratch student 3.3), under 2 %: there is little for distillation to add"
    )
    # Los-loop's preset teacher and student as measured: the student alone is better
    behind = headroom_check(3.286, 3.261)
    assert not behind["worth_distilling"] and behind["relative_gap"] < 0
    assert behind["message"] == (
        "warning: the scratch student is as good as the teacher on validation or better "
        "(teacher 3.286, scratch student 3.261): distillation has nothing to add here; "
        "it needs a teacher clearly ahead of the student trained alone (trained on "
        "more data, or a stronger model)"
    )
    assert behind["validation_mae"] == {"teacher": 3.286, "student_scratch": 3.261}


def test_further_seeds_have_their_own_experiments() -> None:
    from stkd_dist.pipeline.findings import extra_seeds, seed_experiment, with_seed

    cfg = load_config("demo", ["run.seed=3", "run.seeds=3"])
    assert extra_seeds(cfg) == [4, 5]
    assert seed_experiment(True, 4) == "student_kd_seed4"
    assert seed_experiment(False, 5) == "student_scratch_seed5"
    assert with_seed(cfg, 4).run.seed == 4 and with_seed(cfg, 4).student == cfg.student
    assert extra_seeds(load_config("demo")) == []
    with pytest.raises(ConfigError, match=r"run\.seeds: must be > 0"):
        load_config("demo", ["run.seeds=0"])


def test_the_hint_loss_is_no_longer_refused(tmp_path: Path) -> None:
    """A hint run passes the up-front checks: the first error here is the bad endpoint's."""
    from stkd_dist.pipeline.distill import run_distill

    cfg = load_config("demo", ["distill.loss=hint", "distill.beta=0.5", 'serve.endpoints="nohost"'])
    with pytest.raises(ConfigError, match="expected HOST:PORT") as info:
        run_distill(cfg, storage=tmp_path)
    assert info.value.where == "serve.endpoints (--teacher)"
    assert not (tmp_path / "runs").exists()


def test_tls_ca_is_read_on_the_driver_and_checked(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    good = tmp_path / "ca.pem"
    good.write_bytes(ca.cert_pem)
    assert _read_ca(str(good)) == ca.cert_pem
    (tmp_path / "key.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM certificate") as info:
        _read_ca(str(tmp_path / "key.pem"))
    assert info.value.where == "serve.tls_ca"
    with pytest.raises(ConfigError, match="cannot read the CA certificate"):
        _read_ca(str(tmp_path / "missing.pem"))


def test_round_keys_and_unset_features_leave_stage_keys_as_they_were() -> None:
    cfg = load_config("demo", ["run.name=k"])
    # the digest of the sections as they were before rounds and recent_days existed
    full = to_mapping(cfg)
    old_distill = {
        k: v
        for k, v in full["distill"].items()
        if k not in ("rounds", "feedback", "feedback_epochs")
    }
    old_data = {k: v for k, v in full["data"].items() if k != "recent_days"}
    text = json.dumps({"data": old_data, "distill": old_distill}, sort_keys=True, default=str)
    assert config_digest(cfg, ["data", "distill"]) == hashlib.sha256(text.encode()).hexdigest()[:16]
    more = load_config("demo", ["run.name=k", "distill.rounds=3", "distill.feedback=0.2"])
    assert config_digest(more, ["distill"]) == config_digest(cfg, ["distill"])
    assert config_digest(more, ["distill.rounds"]) != config_digest(cfg, ["distill.rounds"])
    recent = load_config("demo", ["run.name=k", "data.recent_days=2"])
    assert config_digest(recent, ["data"]) != config_digest(cfg, ["data"])
