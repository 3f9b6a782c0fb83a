"""Schedules that fit a wall-clock budget (``training.max_minutes``).

With a budget set, a fresh run first measures what its steps cost (:func:`measure`: a
few real training steps, one validation and one checkpoint-sized save, all on a deep
copy of the model with the RNG states restored afterwards, so the run itself trains
bit for bit as without it) and fixes its schedules from that (:func:`fit_schedules`,
a pure function; docs/design.md §6):

* ``max_steps`` = min(configured, the most steps ``n`` whose estimated cost, ``n``
  steps + the validations and checkpoint saves due in ``n`` steps + the final save,
  fits ``(1 - MARGIN)`` of the budget less the time the measurement took);
* when that shortens the run, ``warmup_steps`` and ``kl_warmup_steps`` are scaled by
  the same ratio (fitted / configured ``max_steps``, rounded to the nearest step, at
  least 1 where the configured value is), so the LR schedule decays to its final
  value and the KL weight reaches 1 at the same fraction of the shorter run as of the
  configured one (a cyclical KL schedule spreads its cycles over the fitted steps).

The configured values stay in ``config.yaml``; the fit (inputs, measurements, fitted
values and the rule) is written atomically to ``budget.json`` in the run folder and
one line says it (``budget 6.5 min: R steps/s measured -> max_steps N (of M), warmup
W, kl_warmup K``). Every later launch in the folder (a resume, a
restart after a kill) reads it instead of measuring again, so the resumed run equals
the uninterrupted one; if a budget input changed on resume (``max_steps`` and
``max_minutes`` may), the fit is recomputed from the stored measurements.
``training.resume=never`` measures again. The fitted steps are the budget: the clock
(``WallClockBudget``) stops a fitted run only at ``SAFETY_FACTOR`` (2) times the budget,
a safety net for a machine that slowed down after the measurement, so the runs of one
comparison train at equal compute; a run it stops says so (console, the run folder's
record, comparison tables and charts).

What is timed is the model's own work (collation, forward, backward, clipping, update;
one validation; one save), on one process: the Trainer's per-step bookkeeping (callbacks,
logging) and, across processes, the gradient all-reduce are not. For recipe-sized models
they are a few percent, inside ``MARGIN``; for a tiny model logged every step they can
double the step time (the run then takes longer than the budget, up to the safety net).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ndm_seq.training.config import ConfigError, RunConfig, _one_line
from ndm_seq.training.run_folder import say

logger = logging.getLogger("ndm_seq.training")

BUDGET_FILE = "budget.json"
"""The fit, in the run folder (written by the main process, replaced atomically)."""
MARGIN = 0.1
"""Share of the budget kept free for what the measurement does not see (logging,
data loading, a busier machine)."""
CALIBRATION_STEPS = 6
"""Training steps measured: one untimed warm-up step, then five timed (their median)."""
RULE = (
    "max_steps = min(configured, the most steps n with n * step_seconds + "
    "(n // eval_steps) * eval_seconds + (n // save_steps + 2) * save_seconds <= "
    "(1 - margin) * 60 * budget_minutes - calibration_seconds); if that is below the "
    "configured max_steps, warmup_steps and kl_warmup_steps are scaled by fitted / "
    "configured max_steps (rounded, at least 1 where configured >= 1)"
)


@dataclass(frozen=True)
class Measured:
    """What the steps of a run cost on this machine (seconds)."""

    step_seconds: float
    """One optimizer step (forward, backward, clipping, update)."""
    eval_seconds: float = 0.0
    """One evaluation: the validation loss plus the validation sampling (0: none)."""
    save_seconds: float = 0.0
    """One checkpoint write (weights and optimizer state, fsynced and hashed)."""
    calibration_seconds: float = 0.0
    """How long the measurement took (counted against the budget)."""


@dataclass(frozen=True)
class BudgetInputs:
    """The configured values the fit depends on."""

    max_minutes: float
    max_steps: int
    warmup_steps: int
    kl_warmup_steps: int
    eval_steps: int | None
    save_steps: int

    @classmethod
    def of(cls, run: RunConfig, evaluates: bool = True) -> BudgetInputs:
        t = run.training
        return cls(
            max_minutes=t.max_minutes,
            max_steps=t.max_steps,
            warmup_steps=t.warmup_steps,
            kl_warmup_steps=t.kl_warmup_steps,
            eval_steps=t.eval_steps if evaluates else None,
            save_steps=t.save_steps,
        )


@dataclass(frozen=True)
class BudgetFit:
    """The schedules a run trains with."""

    max_steps: int
    warmup_steps: int
    kl_warmup_steps: int
    binds: bool
    """The budget shortened the run (False: the configured schedules fit)."""


def _scaled(steps: int, ratio: float) -> int:
    if steps <= 0:
        return 0
    return max(1, math.floor(steps * ratio + 0.5))


def fit_schedules(inputs: BudgetInputs, measured: Measured, margin: float = MARGIN) -> BudgetFit:
    """The schedules that fit ``inputs.max_minutes`` at the ``measured`` costs (pure).

    See :data:`RULE`. At least one step is always kept (a budget smaller than one step
    is then ended by ``WallClockBudget``).
    """
    seconds = (1 - margin) * 60 * inputs.max_minutes - measured.calibration_seconds

    def cost(n: int) -> float:
        evals = n // inputs.eval_steps if inputs.eval_steps else 0
        saves = n // inputs.save_steps + 2  # + the final checkpoint and the final model
        return (
            n * measured.step_seconds
            + evals * measured.eval_seconds
            + saves * measured.save_seconds
        )

    lo, hi = 1, inputs.max_steps  # cost is increasing in n: the largest n that fits
    if cost(hi) <= seconds:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid - 1)
    if lo >= inputs.max_steps:
        return BudgetFit(inputs.max_steps, inputs.warmup_steps, inputs.kl_warmup_steps, False)
    ratio = lo / inputs.max_steps
    return BudgetFit(
        lo, _scaled(inputs.warmup_steps, ratio), _scaled(inputs.kl_warmup_steps, ratio), True
    )


def describe(inputs: BudgetInputs, measured: Measured, fit: BudgetFit, source: str) -> str:
    """The one line that says the fit."""
    rate = 1 / measured.step_seconds if measured.step_seconds > 0 else float("inf")
    head = f"budget {inputs.max_minutes:g} min: {rate:.2f} steps/s {source} -> "
    if not fit.binds:
        return head + f"max_steps {fit.max_steps} (of {inputs.max_steps}): the schedules fit"
    return head + (
        f"max_steps {fit.max_steps} (of {inputs.max_steps}), warmup {fit.warmup_steps}, "
        f"kl_warmup {fit.kl_warmup_steps}"
    )


# ----------------------------------------------------------------------------- budget.json


def write_budget(out: Path, inputs: BudgetInputs, measured: Measured, fit: BudgetFit) -> None:
    """``budget.json``, replaced atomically (a kill leaves the old one or none)."""
    record = {
        "budget_minutes": inputs.max_minutes,
        "configured": {k: v for k, v in asdict(inputs).items() if k != "max_minutes"},
        "measured": asdict(measured),
        "margin": MARGIN,
        "fitted": asdict(fit),
        "rule": RULE,
    }
    tmp = out / f".{BUDGET_FILE}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / BUDGET_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def _check_record(inputs: BudgetInputs, measured: Measured) -> None:
    """Raise ``ValueError`` for a ``budget.json`` no measurement could have written: a
    value of the wrong type, not finite, negative, or a step slower than the whole
    measurement that timed five of them."""

    def number(name: str, value, integer: bool = False, optional: bool = False) -> None:
        if value is None and optional:
            return
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            raise ValueError(f"{name} is {value!r}, not a finite number")
        if value < 0:
            raise ValueError(f"{name} is {value!r}, below 0")

    for key, value in asdict(measured).items():
        number(f"measured.{key}", value)
    for key, value in asdict(inputs).items():
        number(key, value, integer=key != "max_minutes", optional=key == "eval_steps")
    if measured.step_seconds <= 0:
        raise ValueError(f"measured.step_seconds is {measured.step_seconds!r}, not above 0")
    if measured.calibration_seconds and measured.step_seconds > measured.calibration_seconds:
        raise ValueError(
            f"measured.step_seconds ({measured.step_seconds!r}) exceeds the measurement's own "
            f"duration (calibration_seconds {measured.calibration_seconds!r})"
        )


def read_budget(out: Path) -> tuple[BudgetInputs, Measured] | None:
    """The stored inputs and measurements, or None without ``budget.json``.

    Raises:
        ConfigError: the file exists but cannot be read.
    """
    path = out / BUDGET_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        inputs = BudgetInputs(max_minutes=record["budget_minutes"], **record["configured"])
        measured = Measured(**record["measured"])
        _check_record(inputs, measured)
        return inputs, measured
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} cannot be read ({_one_line(e)}): it holds the schedules this run was "
            "fitted to; set training.resume=never to start again and measure anew"
        ) from None


# ----------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def _rng_preserved():
    """Every RNG the run draws from (torch CPU and CUDA, Python, NumPy) as it was."""
    import numpy as np

    # The legacy global NumPy state is what a run's code could draw from: keep it.
    py, npy = random.getstate(), np.random.get_state()  # noqa: NPY002
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)  # noqa: NPY002


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rows(dataset, size: int, count: int) -> list[list[dict]]:
    """``count`` batches of ``size`` rows spread evenly over ``dataset`` (read by index:
    no sampler, no RNG)."""
    n = len(dataset)
    return [
        [dataset[((i * n) // count + j) % n] for j in range(min(size, n))] for i in range(count)
    ]


def _collated(trainer, rows: list[dict]) -> dict:
    batch = trainer.data_collator(rows)
    return {k: v.to(trainer.args.device) for k, v in batch.items()}


def _step_seconds(trainer, model, run: RunConfig):
    """Seconds per optimizer step (the median of the timed steps: one step slowed by
    another process does not decide the fit; a step is ``gradient_accumulation_steps``
    forward and backward passes) and the copy's optimizer."""
    t = run.training
    world = max(1, trainer.args.world_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay
    )
    size = max(1, t.batch_size // world)  # each process's share of the global batch
    accumulate = max(1, trainer.args.gradient_accumulation_steps)  # batches per step
    rows = _rows(trainer.train_dataset, size, CALIBRATION_STEPS * accumulate)
    batches = [rows[i : i + accumulate] for i in range(0, len(rows), accumulate)]
    model.train()

    def step(micro_batches):
        for micro in micro_batches:
            batch = _collated(trainer, micro)  # timed too: the Trainer collates every step
            with trainer.accelerator.autocast():
                loss = model(**batch, return_logits=False).loss
            (loss / accumulate).backward()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up: allocations, lazy initialisation
    seconds = []
    for batch in batches[1:]:
        _sync(trainer.args.device)
        start = time.monotonic()
        step(batch)
        _sync(trainer.args.device)
        seconds.append(time.monotonic() - start)
    return statistics.median(seconds), optimizer


def _eval_seconds(trainer, model, run: RunConfig) -> float:
    """One evaluation: the validation loss over the eval set (one batch timed, scaled)
    and the validation sampling (one batch of contexts timed, scaled)."""
    if trainer.eval_dataset is None or trainer.args.eval_strategy == "no":
        return 0.0
    eval_ds, size = trainer.eval_dataset, trainer.args.per_device_eval_batch_size
    batch = _collated(trainer, _rows(eval_ds, size, 1)[0])
    model.eval()
    start = time.monotonic()
    with torch.no_grad(), trainer.accelerator.autocast():
        model(**batch)
    _sync(trainer.args.device)
    seconds = (time.monotonic() - start) * math.ceil(len(eval_ds) / size)
    pairs = getattr(trainer, "text_validation", None)
    if pairs is not None and len(pairs.contexts):
        from ndm_seq.evaluation import evaluate_pairs

        n = min(32, len(pairs.contexts))  # evaluate_pairs' batch of contexts
        start = time.monotonic()
        evaluate_pairs(
            model, trainer.processing_class, pairs.contexts[:n], pairs.references[:n],
            pairs.sampling, max_context_tokens=pairs.max_context_tokens,
            max_response_tokens=pairs.max_response_tokens, seed=run.seed,
        )  # fmt: skip
        seconds += (time.monotonic() - start) * math.ceil(len(pairs.contexts) / n)
    return seconds


def _save_seconds(model, optimizer, out: Path) -> float:
    """Write the weights and optimizer state as a checkpoint does (fsynced, then hashed)."""
    tmp = out / f".budget-calibration.{os.getpid()}.tmp"
    start = time.monotonic()
    try:
        with open(tmp, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    finally:
        tmp.unlink(missing_ok=True)
    return time.monotonic() - start


def measure(trainer, run: RunConfig, out: Path) -> Measured:
    """What a step, an evaluation and a save cost, on a deep copy of ``trainer.model``.

    The run's model, optimizer (not created yet), data order and RNG states are left as
    they were: the copy trains on rows read by index (no sampler), with its own
    optimizer, inside :func:`_rng_preserved`.
    """
    start = time.monotonic()
    with _rng_preserved():
        model = copy.deepcopy(trainer.model)
        step, optimizer = _step_seconds(trainer, model, run)
        evaluation = _eval_seconds(trainer, model, run)
        save = _save_seconds(model, optimizer, out)
        del model, optimizer
    return Measured(step, evaluation, save, time.monotonic() - start)


# ----------------------------------------------------------------------------- the run's fit


def budget_fit(run: RunConfig, trainer, out: Path, resuming: bool) -> BudgetFit | None:
    """The schedules of this launch (None: as configured), measured or read from
    ``budget.json``, which the main process writes; every process gets the same fit."""
    fit = None
    if trainer.is_world_process_zero():
        fit = _main_process_fit(run, trainer, out, resuming)
    if trainer.args.world_size > 1:
        from accelerate.utils import broadcast_object_list

        payload = [None if fit is None else asdict(fit)]
        broadcast_object_list(payload, from_process=0)
        fit = None if payload[0] is None else BudgetFit(**payload[0])
    return fit


def _main_process_fit(run: RunConfig, trainer, out: Path, resuming: bool) -> BudgetFit | None:
    stored = read_budget(out)
    if run.training.max_minutes is None:
        if stored is not None and resuming:
            say(
                f"training.max_minutes is not set: the schedules fitted in {BUDGET_FILE} "
                f"give way to the configured ones (max_steps {run.training.max_steps})",
                warn=True,
            )
        return None
    inputs = BudgetInputs.of(run, evaluates=trainer.args.eval_strategy != "no")
    if stored is None and resuming:
        say(
            f"resuming a run whose schedules were not fitted to a budget (no {BUDGET_FILE}): "
            f"keeping max_steps {inputs.max_steps}; training.max_minutes only stops training",
            warn=True,
        )
        return None
    if stored is None:
        measured, source = measure(trainer, run, out), "measured"
    else:
        (before, measured), source = stored, f"measured earlier ({BUDGET_FILE})"
        if before != inputs:
            changed = {
                k: (v, getattr(inputs, k))
                for k, v in asdict(before).items()
                if v != getattr(inputs, k)
            }
            say(
                f"budget inputs changed since {BUDGET_FILE} was written "
                f"({'; '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}): "
                "fitting again from the stored measurements",
                warn=True,
            )
    fit = fit_schedules(inputs, measured)
    if stored is None or stored[0] != inputs:
        write_budget(out, inputs, measured, fit)
    say(describe(inputs, measured, fit, source))
    return fit
