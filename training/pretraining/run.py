"""barlow-pretrain's body (`training/pretrain.py` parses the options and calls `run_pretraining`):
the accelerator, the model, the data, the plan and optimizer, resuming, the loop, and the outputs.
It reads top to bottom and calls the modules beside it."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import modeling_barlow
from barlow_cli import CommandFailed, prepare_output_dir
from modeling_barlow import (
    BarlowTwinsConfig,
    BarlowTwinsForPreTraining,
    GlobalBatchNorm,
    convert_to_global_batchnorm,
    create_image_processor,
)

from ..arguments import DataArguments, HubArguments, ModelArguments, OutputArguments, PretrainingArguments
from ..shared.checkpointing import CheckpointMismatch, Checkpointer, TrainerState, append_history, load_checkpoint, truncate_history
from ..shared.distributed import create_accelerator, ddp_kwargs_handlers, launched_processes
from ..shared.optim import create_optimizer, create_scheduler, plan_steps
from .collapse import RankMeMonitor
from .data import load_pretraining_data
from .epochs import TrainingBatches
from .loop import LossWindow, NonFiniteLosses, PretrainingStep
from .monitor import KnnMonitor, plot_held_out_cross_correlation
from .signals import StopRequests

logger = get_logger(__name__)

PROG = "barlow-pretrain"
# What a run writes into --output_dir: an earlier run is recognised (and, with
# --overwrite_output_dir, removed) by these; the user's own files there are left alone.
RUN_FILES = (
    "config.json", "model.safetensors", "preprocessor_config.json", "training_args.json", "metrics.json",
    "log_history.jsonl", "cross_correlation.png", "checkpoint-*", ".checkpoint-*.partial", "barlow_twins",
    *(path.name for path in Path(modeling_barlow.__file__).parent.glob("*.py")),  # code copied by save_pretrained
)
# Options that decide the model's shapes: a checkpoint saved with others cannot be resumed.
ARCHITECTURE_FIELDS = ("backbone", "backbone_kwargs", "small_image_stem", "projector_dims", "num_channels")


def run_pretraining(
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: PretrainingArguments,
    out_args: OutputArguments,
    hub_args: HubArguments,
    argv: list[str],
) -> None:
    """barlow-pretrain once its options are parsed: the output folder, the training, the upload."""
    hub_args.check_token()
    prepare_output_dir(
        out_args.output_dir, RUN_FILES, overwrite=out_args.overwrite_output_dir,
        resume=bool(out_args.resume_from_checkpoint), resume_hint="--resume_from_checkpoint latest to continue it",
    )
    with compile_settings(train_args.activation_memory_budget):
        train(data_args, model_args, train_args, out_args, argv)
    url = hub_args.push(out_args.output_dir)
    if url:
        logging.getLogger(__name__).info(f"Pushed the encoder and its model card to {url}")


def compile_settings(activation_memory_budget: float | None = None) -> contextlib.AbstractContextManager:
    """torch.compile settings for the run, read when the model compiles (at its first steps)."""
    if activation_memory_budget is None:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config  # the budget is a prototype: no public name yet

    return functorch_config.patch(activation_memory_budget=activation_memory_budget)


def build_model(model_args: ModelArguments) -> BarlowTwinsForPreTraining:
    if model_args.model_name_or_path:
        return BarlowTwinsForPreTraining.from_pretrained(model_args.model_name_or_path)
    return BarlowTwinsForPreTraining(model_args.to_config())


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run from its latest checkpoint."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name == "--resume_from_checkpoint":
            skip = "=" not in arg
            continue
        if name == "--overwrite_output_dir":  # it would delete the checkpoint to resume from
            continue
        kept.append(arg)
    prog = PROG if Path(sys.argv[0]).name == PROG else "python -m training.pretrain"
    launcher = "accelerate launch [your launch options] " if launched_processes() > 1 else ""
    if launcher and prog == PROG:
        prog = "-m training.pretrain"
    return f"{launcher}{prog} {shlex.join([*kept, '--resume_from_checkpoint', 'latest'])}"


def _same_architecture(config: BarlowTwinsConfig):
    """A check that a checkpoint was saved by a model of this config's shapes."""

    def check(folder: Path) -> None:
        saved_file = folder / "config.json"
        if not saved_file.is_file():
            return  # an older checkpoint without its config: load_state reports shape mismatches
        saved = json.loads(saved_file.read_text())
        differences = [
            f"{name} {saved.get(name)!r} there, {getattr(config, name)!r} here"
            for name in ARCHITECTURE_FIELDS
            if saved.get(name) != getattr(config, name)
        ]
        if differences:
            raise CheckpointMismatch(
                f"{folder} was saved by another model ({'; '.join(differences)}). Resume with the options it was "
                "trained with, or start a new run in another --output_dir."
            )

    return check


def train(
    data_args: DataArguments,
    model_args: ModelArguments,
    train_args: PretrainingArguments,
    out_args: OutputArguments,
    argv: list[str] | None = None,
) -> dict:
    """Pretrain, save the model and metrics into ``out_args.output_dir``; returns the metrics."""
    output_dir = Path(out_args.output_dir)
    accelerator = create_accelerator(
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if out_args.report_to == "none" else out_args.report_to,
        project_dir=str(output_dir),
        dynamo_backend="inductor" if train_args.torch_compile else None,
        kwargs_handlers=ddp_kwargs_handlers(train_args.ddp_comm_hook, launched_processes()),
    )
    set_seed(train_args.seed)
    model = prepare_model(model_args, train_args, accelerator)
    config = model.config
    # Same initial weights everywhere (above), but each process draws its own augmentations: a
    # shared stream would give every shard's i-th image the same crop, colour and blur.
    set_seed(train_args.seed + accelerator.process_index)
    data = load_pretraining_data(data_args, train_args, config, accelerator)

    global_batch = train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps * accelerator.num_processes
    plan = plan_steps(
        data.num_examples, global_batch, num_train_epochs=train_args.num_train_epochs,
        max_train_steps=train_args.max_train_steps, warmup_steps=train_args.warmup_steps,
        warmup_ratio=train_args.warmup_ratio, warmup_epochs=train_args.warmup_epochs,
    )
    optimizer = create_optimizer(
        model, train_args.optimizer, train_args.learning_rate_weights, train_args.learning_rate_biases,
        train_args.weight_decay, global_batch, trust_coefficient=train_args.lars_trust_coefficient,
        trust_clip=train_args.lars_trust_clip,
    )
    # Stepped once per optimizer step by us: accelerate's wrapper would step it once per process.
    scheduler = create_scheduler(optimizer, plan.total_steps, plan.warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state, metrics = resume(accelerator, out_args, config)
    run_config = {
        **asdict(data_args), **asdict(model_args), **asdict(train_args), **asdict(out_args),
        # The model card names a hub dataset only when the data came from the hub.
        "dataset_is_local": data.is_local, "global_batch_size": global_batch, "total_steps": plan.total_steps,
        "warmup_steps": plan.warmup_steps, "steps_per_epoch": plan.steps_per_epoch,
        "num_processes": accelerator.num_processes,
    }
    accelerator.init_trackers("barlow_twins", config={k: v for k, v in run_config.items() if isinstance(v, (int, float, str, bool))})
    logger.info(
        f"Training {config.backbone} for {plan.total_steps} steps (global batch {global_batch}, "
        f"{plan.steps_per_epoch or 'unknown'} steps per epoch, {accelerator.num_processes} processes); warm-up "
        f"{plan.warmup_steps} steps ({plan.warmup_source}).", main_process_only=True,
    )

    # The loop: batches (agreed across processes), the step, logging, checkpoints, monitors.
    knn = KnnMonitor.create(out_args, config, accelerator) if out_args.knn_eval_dataset else None
    collapse = RankMeMonitor.create(data_args, data.image_column, config, accelerator, out_args.rankme_samples,
                                   out_args.rankme_warning_threshold) if out_args.rankme_samples else None
    checkpoints = Checkpointer(accelerator, output_dir, state, config, out_args.save_total_limit)
    step = PretrainingStep(model, optimizer, accelerator)
    window = LossWindow(config.projector_dims[-1], global_batch, train_args.gradient_accumulation_steps)
    progress = tqdm(total=plan.total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="pretraining")
    model.train()
    with StopRequests() as stop, progress:
        batches = TrainingBatches(
            data.stream, data.make_loader, train_args.per_device_train_batch_size, accelerator, state, stop,
            accumulation_steps=train_args.gradient_accumulation_steps,
            persistent_workers=data_args.dataloader_num_workers > 0,
            on_epoch_end=checkpoints.save if out_args.checkpointing_steps == "epoch" else None,
        )
        try:
            for batch in batches if state.global_step < plan.total_steps else ():
                out = step(*data.to_views(batch), state.global_step)
                if out is None:
                    continue
                window.add(out)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state.global_step += 1
                window.steps += 1
                progress.update(1)
                if state.global_step % out_args.logging_steps == 0 or state.global_step == plan.total_steps:
                    metrics = window.read(batches.wait_seconds, scheduler.get_last_lr())
                    if collapse is not None:  # RankMe, after the window's clock (images/s) has been read
                        metrics.update(collapse.measure(accelerator.unwrap_model(model, keep_torch_compile=False),
                                                        state.global_step, last=state.global_step == plan.total_steps))
                        window.restart_clock(batches.wait_seconds)
                    metrics = _log(accelerator, metrics, state, output_dir, progress)
                if _every(out_args.checkpointing_steps, state.global_step):
                    checkpoints.save()
                if knn is not None and out_args.knn_eval_steps and state.global_step % out_args.knn_eval_steps == 0:
                    metrics["knn_top1"] = knn.evaluate(accelerator.unwrap_model(model).barlow_twins, state.global_step)
                if state.global_step >= plan.total_steps:
                    break
        except NonFiniteLosses as error:
            raise CommandFailed(f"{error}; saved {checkpoints.save()}. Lower the learning rates or use "
                                "--mixed_precision no.") from None
    if batches.stopped_by:
        saved = checkpoints.save()
        print(f"Stopped by {batches.stopped_by} at step {state.global_step}. To resume:\n  {resume_command(argv or [])}",
              file=sys.stderr, flush=True)
        raise CommandFailed(f"stopped by {batches.stopped_by} at step {state.global_step}; saved {saved}.")

    total_time = checkpoints.wall_time_s
    if out_args.checkpointing_steps:
        checkpoints.save()
    metrics.update(
        global_step=state.global_step, skipped_images=state.skipped_images,
        epochs=state.global_step / plan.steps_per_epoch if plan.steps_per_epoch else state.epoch,
        # With --resume_from_checkpoint, wall_time_s is this run's part and this the whole training's.
        wall_time_s=round(total_time - checkpoints.resumed_wall_time, 2), total_wall_time_s=round(total_time, 2),
    )
    save_outputs(accelerator.unwrap_model(model, keep_torch_compile=False), metrics, run_config, output_dir, accelerator,
                 knn, data, data_args, state.global_step)
    accelerator.end_training()
    return metrics


def prepare_model(model_args: ModelArguments, train_args: PretrainingArguments, accelerator) -> BarlowTwinsForPreTraining:
    """The model to train, with BatchNorm statistics global across processes (as the loss's are)."""
    model = build_model(model_args)
    if accelerator.num_processes > 1:
        convert_to_global_batchnorm(model)
        left = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       and not isinstance(m, GlobalBatchNorm)})
        if left:
            logger.warning(f"{', '.join(left)} keep per-process batch statistics: only plain BatchNorm layers are "
                           "made global, so this run is not exactly a single process with the global batch.")
    return model.to(memory_format=torch.channels_last if train_args.channels_last else torch.contiguous_format)


def resume(accelerator, out_args: OutputArguments, config: BarlowTwinsConfig) -> tuple[TrainerState, dict]:
    """Where the loop starts, and the metrics as they stood: a checkpoint's with
    --resume_from_checkpoint (the log history cut back to its step), else a fresh start."""
    output_dir = Path(out_args.output_dir)
    if not out_args.resume_from_checkpoint:
        if accelerator.is_main_process:
            (output_dir / "log_history.jsonl").unlink(missing_ok=True)
        return TrainerState(), {}
    path, state = load_checkpoint(accelerator, out_args.resume_from_checkpoint, output_dir, _same_architecture(config))
    metrics = truncate_history(output_dir / "log_history.jsonl", state.global_step) if accelerator.is_main_process else {}
    logger.info(f"Resumed from {path} at step {state.global_step} (epoch {state.epoch}).", main_process_only=True)
    return state, metrics


def save_outputs(model, metrics: dict, run_config: dict, output_dir: Path, accelerator, knn, data, data_args, step: int) -> None:
    """The model folder first, so that nothing after it can lose the trained model; then the
    optional extras (the kNN monitor's last number, the C plot), whose failure is only logged."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(output_dir)
        create_image_processor(model.config).save_pretrained(output_dir)
        (output_dir / "training_args.json").write_text(json.dumps(run_config, indent=2, default=str))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if knn is not None:
        try:
            metrics["knn_top1"] = knn.evaluate(model.barlow_twins, step)
        except (ValueError, OSError, RuntimeError) as error:  # the model is saved: only the last kNN number is lost
            logger.warning(f"No final kNN evaluation: {error}")
            accelerator.wait_for_everyone()  # evaluate() fails on the main process; the others wait in it
    try:
        plot_held_out_cross_correlation(model, data_args, data.image_column, data.collator, data.to_views, accelerator,
                                        output_dir / "cross_correlation.png")
    except (ValueError, OSError) as error:  # a picture is not worth losing the run over
        logger.warning(f"No cross-correlation plot: {error}")
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"Saved the model, metrics and cross_correlation.png to {output_dir}.", main_process_only=True)


def _every(checkpointing_steps: str | None, step: int) -> bool:
    return checkpointing_steps not in (None, "epoch") and step % int(checkpointing_steps) == 0


def _log(accelerator: Accelerator, metrics: dict, state: TrainerState, output_dir: Path, progress) -> dict:
    metrics.update(skipped_images=state.skipped_images, epoch=state.epoch)
    accelerator.log(metrics, step=state.global_step)
    progress.set_postfix(loss=f"{metrics['train_loss']:.1f}", c_diag=f"{metrics['c_diagonal_mean']:.2f}",
                         img_s=f"{metrics['images_per_second']:.0f}")
    logger.info(f"step {state.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                main_process_only=True)
    append_history(output_dir, {"step": state.global_step, **metrics}, accelerator)  # for plots and comparisons
    return metrics

