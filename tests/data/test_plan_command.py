"""``stkd plan``: JSON output equals make_plan (windows only with --windows); summary table;
one-line errors."""

from __future__ import annotations

import json

from stkd_dist.cli import main
from stkd_dist.data.plan import ShardPlan, make_plan
from stkd_dist.data.windows import SplitSpec, WindowSpec, split_windows


def test_plan_json_matches_make_plan(make_store, capsys):
    path = make_store(steps=700, nodes=3, channels=1, chunk_steps=50)
    argv = ["plan", str(path), "--split", "train", "--world-size", "3", "--epoch", "2"]
    argv += ["--batch-size", "16", "--seed", "9", "--input-steps", "6", "--horizon", "4"]
    assert main([*argv, "--stride", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    windows = split_windows(700, WindowSpec(6, 4, 2), SplitSpec(), "train")
    expected = make_plan(windows, 50, 3, epoch=2, seed=9, batch_size=16, shuffle=True)
    assert ShardPlan.from_json(out) == expected
    # by default blocks and counts only: the windows are derived from them
    assert all("windows" not in r for r in out["ranks"])
    assert [r["count"] for r in out["ranks"]] == [r.count for r in expected.ranks]
    assert out["total_padding"] == expected.total_padding <= 2
    assert main([*argv, "--stride", "2", "--json", "--windows"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["ranks"][1]["windows"] == expected.rank_windows(1)
    assert ShardPlan.from_json(listed) == expected
    assert out["window"] == {"input_steps": 6, "horizon": 4, "stride": 2}
    assert out["chunks_read"] == [r.chunks(50, 10) for r in expected.ranks]
    assert out["num_batches"] == expected.num_batches


def test_plan_eval_split_defaults_to_time_order(make_store, capsys):
    path = make_store(steps=700, nodes=3, channels=1, chunk_steps=50)
    assert main(["plan", str(path), "--split", "test", "--json", "--windows"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shuffle"] is False
    assert out["ranks"][0]["windows"] == list(range(560, 700 - 24 + 1))
    # two ranks in time order: consecutive halves, the first one window longer (117 windows)
    assert main(["plan", str(path), "--split", "test", "--world-size", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["count"] for r in out["ranks"]] == [59, 58]
    assert [r["padding"] for r in out["ranks"]] == [0, 1]
    assert out["ranks"][1]["blocks"][0][1] == 560 + 59


def test_plan_summary_table(make_store, capsys):
    path = make_store(steps=700, nodes=3, channels=1, chunk_steps=50)
    assert main(["plan", str(path), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "chunks read" in out and "padding" in out
    assert f"{len(range(0, 490 - 24 + 1))} windows" in out


def test_plan_errors(make_store, capsys):
    path = make_store(steps=200, nodes=3, channels=1, chunk_steps=50)
    assert main(["plan", str(path), "--world-size", "0"]) == 2
    assert "stkd: error: --world-size: must be a positive integer" in capsys.readouterr().err
    assert main(["plan", str(path), "--horizon", "-1"]) == 2
    assert "stkd: error: --horizon:" in capsys.readouterr().err
    assert main(["plan", str(path), "--fractions", "0.5,0.5"]) == 2
    assert "--fractions" in capsys.readouterr().err
    assert main(["plan", str(path), "--split", "val", "--input-steps", "30"]) == 2
    err = capsys.readouterr().err
    assert "split 'val' spans 20 steps" in err and "Traceback" not in err
    assert main(["plan", str(path.parent / "missing.zarr")]) == 2
    capsys.readouterr()
    assert main(["plan", str(path), "--windows"]) == 2
    assert "--windows: lists windows in the JSON output: add --json" in capsys.readouterr().err
