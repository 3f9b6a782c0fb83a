"""``train()``: a run config -> prepared data, tokenizer, ``Trainer`` run, final model.

Also the full-disk error; how a run stops (SIGTERM, nothing trained, short of its
steps) is in :mod:`ndm_seq.training.stopping`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from pathlib import Path

import torch

from ndm_seq.training.budget import BUDGET_FILE, budget_fit
from ndm_seq.training.checkpoints import (
    PREFIX_CHECKPOINT_DIR,
    DiskFullError,
    _checkpoints,
    _latest_checkpoint,
    checkpoint_problem,
    recover_pending,
)
from ndm_seq.training.config import ConfigError, RunConfig, build_model_config, run_config_from_dict
from ndm_seq.training.provenance import write_provenance
from ndm_seq.training.run_folder import (
    RUN_RECORD,
    _file_log,
    _publish_model,
    _setup_run_folder,
    _trim_log_history,
    checkpoint_record,
    run_record,
    say,
)
from ndm_seq.training.schedule import KLSchedule
from ndm_seq.training.stopping import (
    NothingTrained,
    StopOnSignal,
    TrainingInterrupted,
    check_resume_step,
    training_summary,
)
from ndm_seq.training.trainer import (
    Clock,
    _callbacks,
    _compile,
    _make_trainer_class,
    _precision,
    _world_size,
)

logger = logging.getLogger("ndm_seq.training")


# ----------------------------------------------------------------------------- data

PREPARE_WAIT_SECONDS = 3600.0
"""How long ``ndm-seq train`` waits for another process preparing its data folder."""


def prepare_data(run: RunConfig, tokenizer=None) -> dict:
    """Run ``ndm_seq.data.prepare`` for the run's data section (cached by fingerprint)."""
    from ndm_seq.data.pairs import PairOptions
    from ndm_seq.data.prepare import PrepareConfig, prepare

    d = run.data
    options = PairOptions.vmed(**d.options) if d.vmed_preprocessing else PairOptions(**d.options)
    source = d.source
    if source is None and d.download:
        from ndm_seq.data.download import fetch

        source = fetch(
            d.corpus,
            Path("data") / d.corpus / "raw",
            lang=d.download_lang,
            release=d.download_release,
            fmt="xml" if d.opensubtitles_format == "xml" else "text",
            progress=run.training.progress,
        )
    cfg = PrepareConfig(
        corpus=d.corpus,
        source=source,
        opensubtitles_format=d.opensubtitles_format,
        output=d.prepared_dir,
        options=options,
        max_source_tokens=d.max_context_tokens,
        max_target_tokens=d.max_response_tokens,
        max_train_pairs=d.max_train_pairs,
        progress=run.training.progress,
    )
    # Recipes started together share one prepared folder: the later ones wait for
    # the first to write it, then reuse its cache, instead of being refused.
    return prepare(cfg, tokenizer, wait=PREPARE_WAIT_SECONDS)


def train_tokenizer(run: RunConfig, folder: Path):
    """Train (or reload) the run's SentencePiece tokenizer on the training split."""
    import datasets

    from ndm_seq.tokenization_ndm import NDMTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return NDMTokenizer.from_pretrained(folder)
    train_split = datasets.load_from_disk(run.data.prepared_dir)["train"]
    limit = run.tokenizer.max_texts

    def texts():
        n = 0
        for row in train_split.select_columns(["context", "response"]):
            for text in [*row["context"], row["response"]]:
                if n >= limit:
                    return
                n += 1
                yield text

    try:
        tok = NDMTokenizer.train(
            texts(),
            vocab_size=run.tokenizer.vocab_size,
            lowercase=run.tokenizer.lowercase,
            seed=run.seed,
            # The context length the model is trained on: `tok(ctx, truncation=True)` then
            # cuts a long context from the left exactly as prepare did for training.
            model_max_length=run.data.max_context_tokens,
        )
    except ValueError as e:  # a vocabulary too small for the corpus's characters
        raise ConfigError(f"tokenizer.vocab_size: {e}") from None
    tok.save_pretrained(folder)
    return tok


# ----------------------------------------------------------------------------- entry point


def train(run: RunConfig) -> Path:
    """Train one model; returns the final model directory (``<output_dir>/model``).

    Works unchanged under ``torchrun`` / ``accelerate launch``: the main process claims
    and locks the run folder, checks the stored config and records the new one first;
    data preparation and tokenizer training run on the main process first, the others
    reuse the cached results.

    Raises:
        ConfigError: the stored config differs in a key that may not change on resume.
        ndm_seq.folders.FolderError: ``output_dir`` is not a run folder (a user's folder,
            another command's output); ``FolderBusy``: another launch holds it.
        TrainingInterrupted: SIGTERM: a checkpoint was saved, no final model written.
        DiskFullError: a write failed with ENOSPC (the newest complete checkpoint is kept).
    """
    from ndm_seq.progress import library_progress_bars

    stop = StopOnSignal()
    stop.install()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(library_progress_bars(run.training.progress))
            return _train(run, stop, stack)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(
                f"no space left on device while writing {e.filename or run.output_dir}; "
                "the newest complete checkpoint is kept: free some space and run the same "
                "command again"
            ) from None
        raise
    finally:
        stop.uninstall()


def _train(run: RunConfig, stop: StopOnSignal, stack: contextlib.ExitStack) -> Path:
    t = run.training
    out = Path(run.output_dir)
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    args = _training_arguments(run, out)
    run, finished = _claim_and_share(run, args, out, stack)
    if finished is not None:
        if args.process_index == 0:
            say(
                f"{out} is finished (step {finished['step']}) with this same config: nothing "
                f"to do; the model is in {out / 'model'}. To train longer raise "
                "training.max_steps; to start again set training.resume=never"
            )
        return out / "model"
    tokenizer, tokenized, train_ds, eval_ds = _datasets(run, t, args, out)
    clock = Clock(t.max_minutes)
    trainer = _build_trainer(run, t, args, tokenizer, tokenized, train_ds, eval_ds, stop, clock)
    resume = _resume_point(t, trainer, out)
    if trainer.is_world_process_zero():
        write_provenance(out, args, resume)
    fit = budget_fit(run, trainer, out, resuming=resume is not None)
    if fit is not None:  # the schedules fitted to training.max_minutes
        args.max_steps, args.warmup_steps = fit.max_steps, fit.warmup_steps
        trainer.kl_schedule.warmup_steps = fit.kl_warmup_steps
        trainer.kl_schedule.total_steps = fit.max_steps
        clock.safety_net(t.max_minutes)  # the fitted steps are the budget
        if fit.max_steps < t.max_steps and t.logging_steps > 1:
            # A shortened run logs as often, relative to its length, as the configured one
            # (25 of 3000 steps would leave 2 points of a 61-step run).
            args.logging_steps = max(1, round(t.logging_steps * fit.max_steps / t.max_steps))
            logger.info(
                "logging every %d steps of the fitted %d", args.logging_steps, fit.max_steps
            )
    if resume is not None:
        check_resume_step(resume, args.max_steps)
    if stop.requested:
        raise TrainingInterrupted(
            f"stopped by SIGTERM before training started; nothing new saved in {out}"
        )
    if trainer.is_world_process_zero():
        _header(run, trainer, args, train_ds, eval_ds, fit, out)
    stop.defer()  # from here SIGTERM saves a checkpoint at the next step end
    result = trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:
        checkpoint = out / "checkpoints" / f"{PREFIX_CHECKPOINT_DIR}-{stop.stopped_at}"
        logger.warning("stopped by SIGTERM at step %d; checkpoint %s", stop.stopped_at, checkpoint)
        raise TrainingInterrupted(
            f"stopped by SIGTERM at step {stop.stopped_at} of {args.max_steps}; checkpoint saved "
            f"to {checkpoint}; run the same command again to resume",
            checkpoint=str(checkpoint),
        )

    if trainer.state.global_step == 0:
        raise NothingTrained(
            f"{out}: training ended after 0 optimizer steps (training.max_steps "
            f"{args.max_steps}, gradient_accumulation_steps {args.gradient_accumulation_steps}); "
            "no model published"
        )
    summary = training_summary(run, trainer, args, result, resume, clock)
    final = _publish_model(trainer, tokenizer, out, run, summary)
    if trainer.is_world_process_zero():
        from ndm_seq.plots import plot_training_curves

        plot_training_curves(
            trainer.state.log_history, out / "training_curves.png", title=str(out),
            model_config=trainer.model.config,  # a term at weight 0 is not drawn
        )  # fmt: skip
    return final


def _header(run: RunConfig, trainer, args, train_ds, eval_ds, fit, out: Path) -> None:
    """The lines a run starts with: what trains, on what, for how long, where."""
    config = trainer.model.config
    params = sum(p.numel() for p in trainer.model.parameters())
    steps = f"{args.max_steps} steps"
    if fit is not None and fit.max_steps < run.training.max_steps:
        steps += (
            f" (fitted to {run.training.max_minutes:g} min; {run.training.max_steps} configured)"
        )
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    processes = f", {args.world_size} processes" if args.world_size > 1 else ""
    validation = len(eval_ds) if eval_ds is not None else 0
    say(
        f"{config.variant}-{config.backbone}, "
        f"{f'{params / 1e6:.2f}M' if params >= 1e6 else f'{params:,}'} parameters; "
        f"{len(train_ds):,} train / {validation:,} validation pairs; {steps} of batch "
        f"{run.training.batch_size}; {args.device.type} {precision}{processes}; run folder {out}"
    )


def _training_arguments(run: RunConfig, out: Path):
    """The ``TrainingArguments`` of the run (checkpoints under ``out/checkpoints``)."""
    from transformers import TrainingArguments

    from ndm_seq.training.trainer_args import trainer_arguments

    t = run.training
    # Built before the folder is touched (creating them writes nothing); it sets up the
    # process group the ranks use to wait for process 0's claim of the folder.
    settings = dict(
        output_dir=str(out / "checkpoints"),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,  # global: split across processes below
        per_device_eval_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=run.seed,
        data_seed=run.seed,
        report_to="none",
        disable_tqdm=not t.progress,
        logging_nan_inf_filter=False,  # NDMTrainer.training_step filters without a sync
        dataloader_num_workers=t.dataloader_workers,
        prediction_loss_only=True,
        remove_unused_columns=False,
        accelerator_config={"split_batches": True},
        ddp_find_unused_parameters=False,
        # Without a GPU: say so (else accelerate does not treat a torchrun
        # launch as distributed on CPU) and use gloo across processes.
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if _world_size() > 1 and not torch.cuda.is_available() else None,
        dataloader_pin_memory=torch.cuda.is_available(),
        **_precision(t.precision),
        **_compile(t.compile),
    )
    settings.update(trainer_arguments(t))  # the passed-through keys (report_to, ...)
    try:
        return TrainingArguments(**settings)
    except ValueError as e:  # a combination the Trainer refuses: one line, nothing written
        lines = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(
            f"training: transformers' TrainingArguments refused it: {lines}"
        ) from None


def _claim_and_share(
    run: RunConfig, args, out: Path, stack: contextlib.ExitStack
) -> tuple[RunConfig, dict | None]:
    """Process 0 sets up the run folder; every process gets the config it recorded, and
    whether the run is finished already (then nothing is trained)."""
    finished = None
    if args.process_index == 0:
        run, finished = _setup_run_folder(run, out, stack)
    if args.world_size > 1:
        # The other ranks wait here until process 0 has claimed the folder and checked the
        # config, then take the config it recorded (force may have changed it). If process
        # 0 failed, they wait until the launcher stops them: never on a stale config.
        from accelerate.utils import broadcast_object_list

        payload = [(run.to_dict(), finished) if args.process_index == 0 else None]
        broadcast_object_list(payload, from_process=0)
        run, finished = run_config_from_dict(payload[0][0]), payload[0][1]
    if args.process_index != 0:
        _file_log(out, stack)
    return run, finished


def _datasets(run: RunConfig, t, args, out: Path):
    """Prepared data and tokenizer (main process first): ``(tokenizer, tokenized splits,
    train dataset, eval dataset or None)``; no eval data turns evaluation off in ``args``."""
    import datasets
    from transformers import set_seed

    set_seed(run.seed)
    with args.main_process_first(desc="prepare data and tokenizer"):
        prepare_data(run)
        tokenizer = train_tokenizer(run, out / "tokenizer")
        report = prepare_data(run, tokenizer)
    tokenized = datasets.load_from_disk(report["tokenized"]["path"])
    columns = ["input_ids", "attention_mask", "labels"]
    train_ds = tokenized["train"].select_columns(columns)
    if run.data.max_train_pairs:
        train_ds = train_ds.select(range(min(run.data.max_train_pairs, len(train_ds))))
    eval_ds = None
    if t.eval_steps and len(tokenized["validation"]):
        eval_ds = tokenized["validation"].select_columns(columns)
        if run.data.max_eval_pairs:
            eval_ds = eval_ds.select(range(min(run.data.max_eval_pairs, len(eval_ds))))
    elif t.eval_steps:
        args.eval_strategy = "no"
    return tokenizer, tokenized, train_ds, eval_ds


def _build_trainer(run: RunConfig, t, args, tokenizer, tokenized, train_ds, eval_ds, stop, clock):
    """The seeded model, its KL schedule and the trainer with every callback."""
    from transformers import DataCollatorForSeq2Seq, set_seed

    from ndm_seq.decoding import generation_config
    from ndm_seq.models import NDMForConversation

    config = build_model_config(run.model, vocab_size=len(tokenizer))
    _keep_checkpoint_vmed_memory(run, config)
    # Seeded here, not only at the start: whether data and tokenizer were
    # built or reused from the cache must not change the initial weights.
    set_seed(run.seed)
    model = NDMForConversation(config)
    # The decoding defaults of `ndm-seq sample` (generation_config.json of the
    # checkpoints and the final model): a bare `generate` samples as the CLI does.
    model.generation_config = generation_config(config)
    schedule = KLSchedule(
        kind=t.kl_schedule,
        warmup_steps=t.kl_warmup_steps,
        cycles=t.kl_cycles,
        ratio=t.kl_ratio,
        total_steps=t.max_steps,
        constant=config.kl_weight,
    )
    trainer = _make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(
            tokenizer, label_pad_token_id=-100, pad_to_multiple_of=t.pad_to_multiple_of
        ),
        processing_class=tokenizer,
        callbacks=_callbacks(run, schedule, clock),
        max_nonfinite_steps=t.max_nonfinite_steps,
        checkpoint_files={RUN_RECORD: run_record(run, tokenizer)},
    )
    trainer.kl_schedule = schedule  # the budget fit may shorten it (ndm_seq.training.budget)
    if _world_size() > 1:  # every rank stops at the same step when any got SIGTERM

        def any_rank(flag: bool) -> bool:
            value = torch.tensor([float(flag)], device=args.device)
            return trainer.accelerator.reduce(value, reduction="sum").item() > 0

        stop.reduce = any_rank
    trainer.add_callback(stop.callback())
    _tensorboard_in_run_folder(trainer, Path(run.output_dir))
    if eval_ds is not None and t.validation_contexts:
        val = tokenized["validation"]
        n = min(t.validation_contexts, len(val))
        rows = val.select(range(n)).select_columns(["context", "response"])
        trainer.text_validation = _text_validation(run, rows)
    return trainer


def _tensorboard_in_run_folder(trainer, out: Path) -> None:
    """``report_to: tensorboard`` writes to ``<run folder>/tensorboard`` (the callback's
    default is under ``checkpoints/``); ``TENSORBOARD_LOGGING_DIR`` still wins."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(out / "tensorboard")


def _text_validation(run: RunConfig, rows):
    """The validation pairs the trainer samples and scores, with the run's token limits."""
    from ndm_seq.evaluation import SamplingConfig
    from ndm_seq.training.ndm_trainer import TextValidation

    return TextValidation(
        contexts=rows["context"],
        references=rows["response"],
        sampling=SamplingConfig(num_samples=run.training.validation_samples),
        max_context_tokens=run.data.max_context_tokens,
        max_response_tokens=run.data.max_response_tokens,
    )


def _keep_checkpoint_vmed_memory(run: RunConfig, config) -> None:
    """Resuming VMED: build the memory the checkpoint's weights belong to.

    A checkpoint saved before ``vmed_memory`` existed holds the simplified memory
    (its ``config.json`` lacks the field) while a config built today defaults to
    ``"dnc"``: the run continues with ``"simplified"`` (logged), unless
    ``model.vmed_memory`` names another one, which is refused.
    """
    resume = run.training.resume
    if config.variant != "vmed" or resume == "never":
        return
    folder = Path(run.output_dir) / "checkpoints"
    checkpoint = _latest_checkpoint(folder) if resume in ("auto", "force") else resume
    try:
        saved = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):  # no checkpoint (a fresh run) or no config
        return
    memory = saved.get("vmed_memory", "simplified")
    if memory == config.vmed_memory:
        return
    if "vmed_memory" in run.model:
        raise ConfigError(
            f"model.vmed_memory={config.vmed_memory!r}, but checkpoint {checkpoint} holds a "
            f"VMED with the {memory!r} memory: resume with model.vmed_memory={memory} "
            "or start afresh with training.resume=never"
        )
    logger.warning("checkpoint %s holds VMED's %r memory: resuming with it", checkpoint, memory)
    config.vmed_memory = memory


def _check_tokenizer(resume: str, tokenizer, out: Path) -> None:
    """Refuse to resume with a tokenizer other than the one the checkpoint was trained
    with (a replaced ``tokenizer/`` of the same size would train on other ids)."""
    from ndm_seq.data.fingerprints import tokenizer_fingerprint

    recorded = (checkpoint_record(resume) or {}).get("tokenizer")
    current = tokenizer_fingerprint(tokenizer)
    if recorded in (None, current):
        return
    raise ConfigError(
        f"{out / 'tokenizer'} is not the tokenizer {resume} was trained with (fingerprint "
        f"{current[:12]}, recorded {str(recorded)[:12]}); "
        "put the run's tokenizer back, or set training.resume=never to start again"
    )


def _resume_point(t, trainer, out: Path) -> str | None:
    """The checkpoint to resume from (None: a fresh run), with ``log_history.jsonl`` and
    the earlier run's checkpoints made to match.

    First the main process settles a checkpoint write that a kill interrupted (only what
    the pending marker names: the partial folder goes, a folder it replaced comes back).
    """
    if trainer.is_world_process_zero() and (out / "checkpoints").is_dir():
        recover_pending(out / "checkpoints")
    trainer.accelerator.wait_for_everyone()
    resume = None
    if t.resume in ("auto", "force"):
        resume = _latest_checkpoint(out / "checkpoints")
    elif t.resume != "never":
        resume = t.resume
        problem = checkpoint_problem(resume)
        if problem is not None:
            raise ConfigError(f"training.resume={resume!r} cannot be resumed from: {problem}")
    history = out / "log_history.jsonl"
    if resume:
        _check_tokenizer(resume, trainer.processing_class, out)
        if not trainer.is_world_process_zero():
            logger.info("resuming from %s", resume)
        else:
            say(f"resuming from {resume}")
            state = json.loads((Path(resume) / "trainer_state.json").read_text(encoding="utf-8"))
            _trim_log_history(history, int(state["global_step"]))
    elif trainer.is_world_process_zero():
        # A fresh run starts a fresh history (a resumed one appends to it).
        history.unlink(missing_ok=True)
        if t.resume == "never":
            # A fresh run measures its step rate again (ndm_seq.training.budget).
            (out / BUDGET_FILE).unlink(missing_ok=True)
            # The checkpoints of the run this one replaces (train's own, in its own
            # folder): left in place, a later `resume: auto` after a kill before this
            # run's first save would continue the old run's weights.
            for old in _checkpoints(out / "checkpoints") if (out / "checkpoints").is_dir() else []:
                logger.info("training.resume=never: removing the earlier run's %s", old.name)
                shutil.rmtree(old)
    return resume
