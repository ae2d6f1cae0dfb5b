"""Checkpoint aggregation beyond selection: a greedy weight soup and a top-k ensemble of a sweep.

* **Greedy soup** (Wortsman et al., 2022, "Model soups"): the trials with the best trial's
  architecture (key, kwargs, state-dict names, shapes, dtypes), by validation MAE; from the best
  on, each next trial joins the soup (the uniform average of its members' weights) only if that
  lowers the soup's validation MAE. Exported to ``<sweep>/soup/``, a student checkpoint in the
  format of ``best/`` (``stkd evaluate <sweep>/soup --role student_sweep`` reads it).
* **Top-k ensemble**: the mean forecast (original units) of the ``k`` best trials, any
  architectures. Exported as ``<sweep>/ensemble/manifest.json`` (members + weights,
  :func:`load_ensemble`).

Both are chosen on the validation split only; the test split is read once per aggregate at the
end, and ``beats_best`` compares that test MAE with the best single trial's, so a win is not a
selection effect on test. Exports are assembled under a temporary name and moved into place with
their completion marker last, as :func:`~.sweep_results.export_best` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from stkd_dist.config import write_config
from stkd_dist.errors import InputError, StoreError
from stkd_dist.location import (
    Location,
    copy_tree,
    exists,
    location,
    read_json,
    relative,
    remove,
    rename_or_copy,
    scratch_dir,
    temporary_sibling,
    url,
    write_json_atomic,
)
from stkd_dist.pipeline.sweep_combine import (
    MeanEnsemble,
    Soup,
    StateDict,
    architecture,
    greedy_soup,
)
from stkd_dist.pipeline.sweep_results import SweepLayout, TrialRow, json_safe
from stkd_dist.pipeline.trial_records import ROLE

if TYPE_CHECKING:
    from stkd_dist.checkpoint import CheckpointInfo
    from stkd_dist.data.reader import WindowReader
    from stkd_dist.metrics import MetricResult
    from stkd_dist.models import Forecaster

Echo = Callable[[str], None]

SOUP = "soup"
ENSEMBLE = "ensemble"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


# -- ensemble manifest -----------------------------------------------------------------------


def load_ensemble(folder: str | Location) -> MeanEnsemble:
    """The ensemble exported to ``folder`` (its ``manifest.json``), members on the CPU."""
    from stkd_dist.checkpoint import load_forecaster

    folder = location(folder)
    where = url(folder / MANIFEST)
    try:
        manifest = read_json(folder / MANIFEST)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise StoreError(f"manifest format {manifest.get('format')!r}", where=where)
        refs = [(str(m["checkpoint"]), float(m["weight"])) for m in manifest["members"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"unreadable ensemble manifest ({e!r})", where=where) from e
    models = [load_forecaster(_resolve(ref, folder.parent), ROLE)[0] for ref, _ in refs]
    return MeanEnsemble(models, [w for _, w in refs]).eval()


def _ref(loc: Location, root: Location) -> str:
    """``loc`` relative to ``root`` when inside it (survives moving the run), else its URL."""
    try:
        return relative(loc, root)
    except (ValueError, TypeError):  # another folder, or another filesystem than ``root``
        return url(loc)


def _resolve(ref: str, root: Location) -> Location:
    return location(ref) if "://" in ref or Path(ref).is_absolute() else root / ref


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregate:
    """A soup or an ensemble of the sweep's trials, evaluated.

    Attributes:
        name: ``soup`` or ``ensemble`` (its ``trial`` on the leaderboard).
        members: the trials in it (soup: in the order they joined; ensemble: best first).
        params: trainable parameters (soup: one model's; ensemble: the members' sum).
        model: the student key (ensemble: the members' distinct keys joined by ``+``).
        val_mae, val_rmse, val_mape: on the validation split.
        test_mae, test_rmse, test_mape: on the test split.
        beats_best: its test MAE is strictly below the best single trial's.
        exported: the folder it was exported to.
    """

    name: str
    members: tuple[str, ...]
    params: int
    model: str
    val_mae: float
    val_rmse: float
    val_mape: float
    test_mae: float
    test_rmse: float
    test_mape: float
    beats_best: bool
    exported: Location

    @classmethod
    def of(
        cls,
        name: str,
        members: Sequence[TrialRow] | tuple[str, ...],
        params: int,
        model: str,
        val: MetricResult,
        test: MetricResult,
        best: TrialRow,
        exported: Location,
    ) -> Aggregate:
        """The record of an aggregate evaluated as ``val`` and ``test``, compared with ``best``."""
        return cls(
            name=name,
            members=tuple(m if isinstance(m, str) else m.trial for m in members),
            params=int(params),
            model=model,
            val_mae=float(val.mae),
            val_rmse=float(val.rmse),
            val_mape=float(val.mape),
            test_mae=float(test.mae),
            test_rmse=float(test.rmse),
            test_mape=float(test.mape),
            # strict, and False when either MAE is NaN: a win must be a measured one
            beats_best=bool(test.mae < best.test_mae),
            exported=exported,
        )

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{"val": {mae, rmse, mape}, "test": {...}}`` (what the exports record)."""
        return {
            "val": {"mae": self.val_mae, "rmse": self.val_rmse, "mape": self.val_mape},
            "test": {"mae": self.test_mae, "rmse": self.test_rmse, "mape": self.test_mape},
        }

    def record(self, root: Location) -> dict[str, Any]:
        """The leaderboard row: :meth:`TrialRow.record`'s columns that apply, plus ``members``."""
        return {
            "trial": self.name,
            "kind": self.name,
            "params": self.params,
            "val_mae": self.val_mae,
            "test_mae": self.test_mae,
            "test_rmse": self.test_rmse,
            "test_mape": self.test_mape,
            "model": self.model,
            "members": " ".join(self.members),
            "checkpoint": _ref(self.exported, root),
        }

    def summary(self, root: Location) -> dict[str, Any]:
        """For ``summary.json``: the record with the members as a list and the comparison."""
        return {
            **self.record(root),
            "members": list(self.members),
            "val_rmse": self.val_rmse,
            "val_mape": self.val_mape,
            "beats_best": self.beats_best,
        }


@dataclass(frozen=True)
class Aggregates:
    """What :func:`aggregate` built.

    Attributes:
        best: the best single trial (lowest validation MAE), the one both are compared with.
        soup, ensemble: the two aggregates.
        soup_tried: ``(trial, soup validation MAE with it, accepted)`` for every soup candidate.
        soup_excluded: trials left out of the soup for another architecture than ``best``'s.
    """

    best: TrialRow
    soup: Aggregate
    ensemble: Aggregate
    soup_tried: tuple[tuple[str, float, bool], ...]
    soup_excluded: tuple[str, ...]

    def rows(self, root: Location) -> list[dict[str, Any]]:
        """Leaderboard rows ``soup`` and ``ensemble`` (append them to the trials' records)."""
        return [self.soup.record(root), self.ensemble.record(root)]

    def summary(self, root: Location) -> dict[str, Any]:
        """JSON-safe data for ``summary.json``."""
        tried = [{"trial": t, "val_mae": v, "accepted": a} for t, v, a in self.soup_tried]
        return json_safe(
            {
                "best": {"trial": self.best.trial, "test_mae": self.best.test_mae},
                SOUP: {
                    **self.soup.summary(root),
                    "tried": tried,
                    "excluded": list(self.soup_excluded),
                },
                ENSEMBLE: self.ensemble.summary(root),
            }
        )


# -- export ----------------------------------------------------------------------------------


def _swap_in(tmp: Location, dest: Location, last: tuple[str, ...]) -> None:
    """Replace ``dest`` with the complete folder ``tmp`` (the names in ``last`` copied last)."""
    old = temporary_sibling(dest, "old")
    try:
        if exists(dest):
            rename_or_copy(dest, old)
        rename_or_copy(tmp, dest, last=last)
    finally:
        remove(old)


def export_soup(
    soup: Soup, model: Forecaster, base: CheckpointInfo, dest: Location, metrics: dict[str, Any]
) -> Location:
    """Write ``soup`` as a student checkpoint folder ``dest`` in the format of ``best/``.

    The checkpoint takes the config, dataset, statistics and training state of ``base`` (the
    best trial's checkpoint, where the soup started); ``metrics`` (``{"val": ..., "test": ...}``)
    go to ``metrics.json``, the validation MAE also to ``meta.json``.
    """
    from stkd_dist.checkpoint import CONFIG_FILE, META, save_checkpoint

    # save_checkpoint writes to a local disk only: build it in scratch, then copy it to storage
    scratch = scratch_dir(SOUP)
    tmp = temporary_sibling(dest)
    try:
        val_mae = metrics["val"]["mae"]
        info = save_checkpoint(
            scratch / "checkpoint",
            model_state=soup.state,
            spec=model.spec(),
            config=base.config,
            fingerprint=base.fingerprint,
            stats=base.stats,
            metrics={"val_mae": val_mae} if math.isfinite(val_mae) else {},
            state=base.state,
            role=base.role,
            dataset=base.dataset,
        )
        copy_tree(location(scratch / "checkpoint"), tmp, last=(META,))
        write_config(base.config, tmp / CONFIG_FILE)
        write_json_atomic(
            tmp / "metrics.json",
            json_safe(
                {
                    "trial": SOUP,
                    "members": list(soup.members),
                    "version": info.version,
                    "epoch": info.epoch,
                    "params": model.num_params(),
                    "val_mae": val_mae,
                    **metrics,
                }
            ),
        )
        _swap_in(tmp, dest, (META,))
    finally:
        remove(tmp)
        remove(location(scratch))
    return dest


def export_ensemble(
    members: Sequence[TrialRow], weights: Sequence[float], dest: Location, metrics: dict[str, Any]
) -> Location:
    """Write the ensemble's ``manifest.json`` into folder ``dest``.

    Members' checkpoints are recorded relative to ``dest``'s parent (the sweep folder, as on the
    leaderboard) when they lie inside it, else by URL.
    """
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": "mean_forecast",
        "members": [
            {
                "trial": r.trial,
                "model": r.model,
                "checkpoint": _ref(r.checkpoint, dest.parent),
                "weight": w,
                "val_mae": r.val_mae,
            }
            for r, w in zip(members, weights, strict=True)
        ],
        **metrics,
    }
    tmp = temporary_sibling(dest)
    try:
        write_json_atomic(tmp / MANIFEST, json_safe(manifest))
        _swap_in(tmp, dest, (MANIFEST,))
    finally:
        remove(tmp)
    return dest


# -- the sweep's entry point -----------------------------------------------------------------


def aggregate(
    rows: Sequence[TrialRow],
    reader: WindowReader,
    batch_size: int,
    layout: SweepLayout,
    k: int = 3,
    echo: Echo = print,
) -> Aggregates:
    """Build, evaluate and export the greedy soup and the top-``k`` ensemble of ``rows``.

    ``rows`` are :func:`~.sweep_results.collect_rows`'s (any order: ranked here by validation MAE,
    then size, then id, as the leaderboard is); ``reader`` and ``batch_size`` are what they were
    evaluated with. Writes ``<sweep>/soup/`` and ``<sweep>/ensemble/``, replacing earlier ones.
    """
    from stkd_dist.train.evaluate import predict_metrics

    if not rows:
        raise InputError("no trials to aggregate", where="sweep")
    if k < 1:
        raise InputError(f"must be >= 1, got {k}", where="k")
    ranked = sorted(rows, key=lambda r: (r.val_mae, r.params, r.trial))
    best = ranked[0]

    def evaluate(model: nn.Module, split: str) -> MetricResult:
        return predict_metrics(model, reader, split, batch_size)

    # soup: only trials whose weights can be averaged with the best one's
    template, base = best.load()
    arch = architecture(template)
    excluded: list[str] = []

    def candidates() -> Iterator[tuple[str, StateDict]]:
        # the template is loaded with every soup tried: start from a copy of its weights
        yield best.trial, {n: t.detach().clone() for n, t in template.state_dict().items()}
        for row in ranked[1:]:
            model = row.load()[0] if row.model == best.model else None
            if model is None or architecture(model) != arch:
                excluded.append(row.trial)
                continue
            yield row.trial, model.state_dict()

    soup = greedy_soup(template, candidates(), lambda m: evaluate(m, "val").mae)
    # one more validation pass for the soup's RMSE and MAPE (the greedy loop compares MAE only)
    val, test = evaluate(template, "val"), evaluate(template, "test")
    soup_agg = Aggregate.of(
        SOUP, soup.members, template.num_params(), best.model, val, test, best, layout.soup
    )
    export_soup(soup, template, base, layout.soup, soup_agg.metrics())
    echo(
        f"soup: {len(soup.members)} of {len(soup.tried)} trials of {best.model!r} "
        f"({', '.join(soup.members)}), val MAE {val.mae:.4g}, test MAE {test.mae:.4g} "
        f"vs {best.test_mae:.4g} for trial {best.trial}"
        + (f"; {len(excluded)} of another architecture left out" if excluded else "")
    )

    top = ranked[:k]
    ensemble = MeanEnsemble([r.load()[0] for r in top])
    val, test = evaluate(ensemble, "val"), evaluate(ensemble, "test")
    keys = "+".join(dict.fromkeys(r.model for r in top))
    params = ensemble.num_params()
    ens_agg = Aggregate.of(ENSEMBLE, top, params, keys, val, test, best, layout.ensemble)
    export_ensemble(top, ensemble.weights, layout.ensemble, ens_agg.metrics())
    echo(
        f"ensemble of the {len(top)} best trials: val MAE {val.mae:.4g}, "
        f"test MAE {test.mae:.4g} vs {best.test_mae:.4g} for trial {best.trial}"
    )
    return Aggregates(best, soup_agg, ens_agg, soup.tried, tuple(excluded))


__all__ = [
    "ENSEMBLE",
    "MANIFEST",
    "SOUP",
    "Aggregate",
    "Aggregates",
    "aggregate",
    "export_ensemble",
    "export_soup",
    "load_ensemble",
]
