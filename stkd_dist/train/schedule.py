"""Learning-rate schedules, stepped once per epoch.

With peak rate ``lr``, ``W = warmup_epochs`` and ``E = epochs``, the rate used during epoch ``e``
(0-based) is

* warm-up, ``e < W``: ``lr * (e + 1) / (W + 1)`` (rising linearly, full rate at ``e = W``);
* ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * (e - W) / (E - W))) / 2``;
* ``step``: ``lr * gamma ** ((e - W) // step_size)``;
* ``constant``: ``lr``.

:func:`lr_factor` is the pure formula (as a multiple of ``lr``); :func:`build_scheduler` wraps it
in ``torch.optim.lr_scheduler.LambdaLR`` so its state is saved with every checkpoint and a resumed
run continues at the same rate.
"""

from __future__ import annotations

import math

import torch

from stkd_dist.config.models import OptimSection, ScheduleSection


def lr_factor(epoch: int, schedule: ScheduleSection, base_lr: float) -> float:
    """The learning rate of epoch ``epoch`` as a multiple of ``base_lr``."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    w = schedule.warmup_epochs
    if epoch < w:
        return (epoch + 1) / (w + 1)
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "step":
        return schedule.gamma ** ((epoch - w) // schedule.step_size)
    # cosine from the peak down towards min_lr over the epochs after warm-up
    span = max(schedule.epochs - w, 1)
    progress = min((epoch - w) / span, 1.0)
    floor = min(schedule.min_lr / base_lr, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(epoch: int, schedule: ScheduleSection, base_lr: float) -> float:
    """The learning rate of epoch ``epoch``."""
    return base_lr * lr_factor(epoch, schedule, base_lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleSection
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``optimizer`` following ``schedule``; call ``.step()`` after each epoch.

    Every parameter group gets the same factor, relative to its own initial rate.
    """
    base = float(optimizer.param_groups[0]["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda=lambda epoch: lr_factor(epoch, schedule, base)
    )


def apply_optim_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optim: OptimSection,
) -> None:
    """Give a restored optimizer and schedule the job's own ``lr``, weight decay and betas.

    A loaded optimizer state carries the settings of the run that saved it: after a PBT
    exploit that is the donor trial, whose settings the trial's mutated ones replace. The
    schedule keeps its position (``last_epoch``). For a run restored from its own checkpoint
    nothing changes: the learning rate is computed as the schedule computes it, bit for bit.
    """
    scheduler.base_lrs = [optim.lr for _ in optimizer.param_groups]
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        group["initial_lr"] = optim.lr
        group["lr"] = optim.lr * factor
        group["weight_decay"] = optim.weight_decay
        group["betas"] = optim.betas
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
