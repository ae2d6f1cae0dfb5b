"""The stage mechanism distill and sweep share: typed records, skip and redo by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stkd_dist.config import load_config
from stkd_dist.pipeline.graph import LabelStage, ModelStage, NoteStage, StageGraph
from stkd_dist.pipeline.stages import RaySession
from stkd_dist.pipeline.ui import LinesUI


@pytest.fixture
def graph(tmp_path: Path) -> StageGraph:
    cfg = load_config("demo", ["run.name=graph"])
    names = ["dataset", "teacher", "labels", "report"]
    return StageGraph(cfg, tmp_path, LinesUI(), names, RaySession(cfg))


def test_records_round_trip_through_stages_json(graph: StageGraph, tmp_path: Path) -> None:
    layout = graph.layout
    out = layout.root / "teacher" / "best"
    out.mkdir(parents=True)
    model = ModelStage("teacher/best", "graph-e3-abcd", 1.25, epochs=4, trained=True)
    got = graph.step("teacher", "k1", ModelStage.from_info, lambda: ([out], model))
    assert got == model
    # the record on disk is plain JSON that reads back as the same typed record
    info = json.loads(layout.stages.read_text())["stages"]["teacher"]["info"]
    assert ModelStage.from_info(info) == model
    assert graph.recorded("teacher", ModelStage.from_info) == model
    assert model.path(layout) == layout.root / "teacher" / "best"

    cache = LabelStage("labels/v.zarr", "graph-e3-abcd", {"train": 120}, 120)
    (layout.root / "labels" / "v.zarr").mkdir(parents=True)
    assert LabelStage.from_info(cache.to_info()) == cache
    assert cache.distinct_windows == 120 and "120 teacher forward passes" in cache.detail()
    assert NoteStage.from_info(NoteStage("done").to_info()) == NoteStage("done")


def test_a_complete_stage_is_skipped_and_a_changed_key_redoes_it(graph: StageGraph) -> None:
    out = graph.layout.root / "report.md"
    graph.layout.root.mkdir(parents=True)
    calls: list[str] = []

    def work() -> tuple[list[Path], NoteStage]:
        calls.append("ran")
        out.write_text("x")
        return [out], NoteStage(f"run {len(calls)}")

    assert graph.step("report", "a", NoteStage.from_info, work) == NoteStage("run 1")
    # same key, outputs present: the record is read back, nothing runs
    assert graph.step("report", "a", NoteStage.from_info, work) == NoteStage("run 1")
    assert calls == ["ran"]
    assert [r.status for r in graph.reports] == ["ran", "skipped"]
    assert graph.step("report", "b", NoteStage.from_info, work) == NoteStage("run 2")
    out.unlink()  # an output gone: redone with the same key
    assert graph.step("report", "b", NoteStage.from_info, work) == NoteStage("run 3")
    assert calls == ["ran"] * 3


def test_a_checkpoint_outside_the_run_is_recorded_absolute(
    graph: StageGraph, tmp_path: Path
) -> None:
    from stkd_dist.pipeline.stages import TrainResult

    outside = tmp_path / "elsewhere" / "epoch_0001"
    outside.mkdir(parents=True)
    res = TrainResult(outside, "v", 2.0, 2, False)
    record = ModelStage.of(graph.layout, res)
    assert record.checkpoint == str(outside) and record.path(graph.layout) == outside
    inside = graph.layout.root / "teacher" / "epoch_0001"
    record = ModelStage.of(graph.layout, TrainResult(inside, "v", 2.0, 2, False))
    assert record.checkpoint == "teacher/epoch_0001"


def test_a_training_folder_of_other_inputs_is_moved_aside_and_one_of_these_is_kept(
    tmp_path: Path,
) -> None:
    cfg = load_config("demo", ["run.name=graph"])
    names = ["student_kd", "student_scratch"]
    graph = StageGraph(cfg, tmp_path, LinesUI(), names, RaySession(cfg))
    exp = graph.layout.experiment("student_kd")
    # a folder from before key files, whose completed record has another key: moved aside
    (exp / "epoch_0000").mkdir(parents=True)
    (exp / "history.jsonl").write_text('{"epoch": 0}\n')
    graph.step("student_kd", "old", NoteStage.from_info, lambda: ([exp], NoteStage("old")))
    graph.fresh_experiment("student_kd", "new", exp)
    moved = list((graph.layout.root / "superseded").iterdir())
    assert len(moved) == 1 and (moved[0] / "history.jsonl").read_text() == '{"epoch": 0}\n'
    assert sorted(p.name for p in exp.iterdir()) == ["stage_key.json"]
    # the new training was interrupted: the same key resumes its folder as it is
    (exp / "epoch_0000").mkdir()
    graph.fresh_experiment("student_kd", "new", exp)
    assert (exp / "epoch_0000").is_dir()
    assert len(list((graph.layout.root / "superseded").iterdir())) == 1
    # a folder of no recorded stage (the first training, interrupted) is resumed too
    first = graph.layout.experiment("student_scratch")
    (first / "epoch_0000").mkdir(parents=True)
    graph.fresh_experiment("student_scratch", "k", first)
    assert (first / "epoch_0000").is_dir()
    # a folder whose key file names other inputs: moved aside, even with no record at all
    graph.fresh_experiment("student_scratch", "k2", first)
    assert not (first / "epoch_0000").exists()
    assert len(list((graph.layout.root / "superseded").iterdir())) == 2
