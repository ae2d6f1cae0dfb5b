"""``distill.rounds``: teacher → soft labels → student → student predictions → teacher, again.

Round 1 is the run's teacher and its distilled student (``teacher``, ``student_kd``). Each
further round ``r`` adds four stages, each resumable and skipped by key like the others:

1. ``student_labels_round<r>``: the previous round's student's predictions on every training
   window, once, into the run's label cache (the student is labelled like any teacher);
2. ``teacher_round<r>``: the previous round's teacher fine-tuned on the targets and those
   predictions (weight ``distill.feedback``), see :mod:`stkd_dist.train.feedback`;
3. ``labels_round<r>`` (``serve.mode: cache``): that teacher's labels; with ``stream`` the
   student streams them from replicas of it, as in round 1;
4. ``student_kd_round<r>``: a new student distilled from that teacher (from scratch, with the
   run's seed and shard plans: what differs from round 1's student is the teacher alone).

The ``statistics`` stage measures every round's teacher and student on the test split and adds
the ``rounds`` finding (:func:`rounds_finding`), which says plainly whether rounds helped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stkd_dist.config import Config
from stkd_dist.data.reader import WindowReader
from stkd_dist.location import Location, PathInput
from stkd_dist.pipeline.graph import LabelStage, ModelStage, StageGraph
from stkd_dist.pipeline.run import config_digest
from stkd_dist.pipeline.stages import train_feedback_stage

#: what the fine-tuned teacher of a round depends on, besides the models it starts from
FEEDBACK_SECTIONS = (
    "data",
    "teacher",
    "distill.task",
    "distill.feedback",
    "distill.feedback_epochs",
    "run.seed",
)

#: distills a student: ``(experiment name, teacher, its label cache or None) -> record``
DistillStudent = Callable[[str, ModelStage, LabelStage | None], ModelStage]


@dataclass(frozen=True)
class Round:
    """One round's teacher and its distilled student."""

    round: int
    teacher: ModelStage
    student: ModelStage


def round_stage_names(cfg: Config) -> list[str]:
    """The stages ``distill.rounds`` adds after round 1, in order."""
    names: list[str] = []
    for r in range(2, cfg.distill.rounds + 1):
        names += [f"student_labels_round{r}", f"teacher_round{r}"]
        if cfg.serve.mode == "cache":
            names.append(f"labels_round{r}")
        names.append(f"student_kd_round{r}")
    return names


def feedback_teacher(
    graph: StageGraph, storage: PathInput | None, r: int, prev: Round, student_labels: LabelStage
) -> ModelStage:
    """Stage ``teacher_round<r>``: ``prev``'s teacher fine-tuned with ``prev``'s student's
    predictions (``student_labels``)."""
    cfg, layout, name = graph.cfg, graph.layout, f"teacher_round{r}"
    key = config_digest(
        cfg,
        list(FEEDBACK_SECTIONS),
        fingerprint=graph.fingerprint,
        teacher=prev.teacher.version,
        student=prev.student.version,
    )

    def work() -> tuple[list[Location], ModelStage]:
        graph.ui.echo(f"Ray: {graph.ray.ensure()}")
        experiment = layout.experiment(name)
        graph.fresh_experiment(name, key, experiment)
        with graph.ui.training(experiment, f"teacher, round {r}", cfg.distill.feedback_epochs):
            res = train_feedback_stage(
                cfg,
                start=prev.teacher.path(layout),
                student_labels=student_labels.location(layout),
                experiment=name,
                storage=storage,
                echo=graph.ui.echo,
            )
        return [experiment / "best.json", res.checkpoint], ModelStage.of(layout, res)

    return graph.step(name, key, ModelStage.from_info, work)


def run_rounds(
    graph: StageGraph,
    storage: PathInput | None,
    first: Round,
    splits: Sequence[str],
    distill_student: DistillStudent,
) -> list[Round]:
    """Every round of ``distill.rounds``, round 1 (``first``, already trained) included."""
    cfg = graph.cfg
    rounds = [first]
    hint = cfg.distill.loss == "hint"
    for r in range(2, cfg.distill.rounds + 1):
        prev = rounds[-1]
        # the student's predictions are labels like a teacher's (forecasts only)
        predictions = graph.labels(prev.student, splits, name=f"student_labels_round{r}")
        teacher = feedback_teacher(graph, storage, r, prev, predictions)
        cache = None
        if cfg.serve.mode == "cache":
            cache = graph.labels(teacher, splits, hidden=hint, name=f"labels_round{r}")
        student = distill_student(f"student_kd_round{r}", teacher, cache)
        rounds.append(Round(r, teacher, student))
    return rounds


def rounds_finding(
    rounds: Sequence[Round], test_mae: Mapping[str, float], scratch_test_mae: float
) -> dict[str, Any]:
    """The ``rounds`` entry of ``metrics.json``: per round, the teacher's and the student's
    validation and test MAE, and a verdict comparing the last round's student with round 1's.

    Args:
        rounds: every round, in order.
        test_mae: test MAE by model version (each round's teacher and student).
        scratch_test_mae: the scratch student's test MAE (the bar distillation must clear).
    """
    rows: list[dict[str, Any]] = [
        {
            "round": x.round,
            "teacher": x.teacher.version,
            "teacher_val_mae": x.teacher.val_mae,
            "teacher_test_mae": test_mae[x.teacher.version],
            "student": x.student.version,
            "student_val_mae": x.student.val_mae,
            "student_test_mae": test_mae[x.student.version],
        }
        for x in rounds
    ]
    first, last = rows[0]["student_test_mae"], rows[-1]["student_test_mae"]
    change = 100.0 * (last - first) / first if first else 0.0
    k = len(rows)
    if last < first:
        verdict = (
            f"{k} rounds helped: the round-{k} student's test MAE is {last:.4f}, "
            f"{-change:.1f} % below round 1's {first:.4f}"
        )
    else:
        verdict = (
            f"{k} rounds did not help: the round-{k} student's test MAE is {last:.4f}, "
            f"{change:.1f} % above round 1's {first:.4f}"
        )
    best = min(r["student_test_mae"] for r in rows)
    verdict += (
        f"; the best round's student {'beats' if best < scratch_test_mae else 'does not beat'} "
        f"the scratch student ({scratch_test_mae:.4f})"
    )
    return {"rounds": rows, "change_percent": change, "helped": last < first, "verdict": verdict}


def round_models(rounds: Sequence[Round]) -> dict[str, ModelStage]:
    """Every round's teacher and student by version (what the test pass measures)."""
    out: dict[str, ModelStage] = {}
    for x in rounds:
        out[x.teacher.version] = x.teacher
        out[x.student.version] = x.student
    return out


def measure_rounds(
    graph: StageGraph, reader: WindowReader, rounds: Sequence[Round], batch_size: int
) -> dict[str, float]:
    """Test MAE of every round's teacher and student, by version (one pass over the split)."""
    from stkd_dist.checkpoint import load_forecaster
    from stkd_dist.pipeline.findings import model_predictor, split_mae

    predict = {
        version: model_predictor(load_forecaster(m.path(graph.layout), role="teacher")[0])
        for version, m in round_models(rounds).items()
    }
    return split_mae(reader, predict, "test", batch_size)
