"""The one-command distillation pipeline (``stkd distill``) and the functions its stages share.

* :mod:`.run`: the run directory's layout and the ``stages.json`` bookkeeping that lets a re-run
  skip completed stages;
* :mod:`.stages`: the stage functions (dataset, teacher, label cache, students),
  shared with ``stkd sweep``;
* :mod:`.latency`: CPU inference latency of several models, measured side by side;
* :mod:`.evaluate_all`: test metrics of every model and baseline, per-node errors, forecasts;
* :mod:`.outputs`: the run's result files (``metrics.json``, ``history.json``, ``*.npz``);
* :mod:`.ui`: stage headers, progress bars and summary tables;
* :mod:`.distill`: the orchestration of the stages.
"""
