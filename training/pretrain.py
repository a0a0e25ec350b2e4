"""Barlow Twins pretraining with Accelerate, streaming images from `datasets`.

    accelerate launch -m training.pretrain --dataset_name <hub id or folder> --output_dir out
    barlow-pretrain --output_dir out            # scikit-learn's digits, offline

Reads top to bottom like HF's `run_*_no_trainer.py`: arguments, accelerator, model, data,
optimizer, loop, save. Run with `--help` for every option.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm

from barlow_cli import parse_arguments
from modeling_barlow import (
    BarlowTwinsForPreTraining,
    GlobalBatchNorm,
    convert_to_global_batchnorm,
    create_image_processor,
)

from .arguments import (
    DataArguments,
    HubArguments,
    ModelArguments,
    OutputArguments,
    PretrainingArguments,
)
from .augment import TwoViewBatchAugmentation, TwoViewCropTransform, TwoViewTransform
from .checkpointing import TrainerState, load_checkpoint, save_checkpoint, truncate_history
from .collate import TwoViewCollator, whole_batches
from .collapse import RankMeMonitor
from .collective import all_processes, is_finite_later
from .data import (
    count_examples,
    load_image_dataset,
    prepare_stream,
    resolve_image_column,
)
from .monitor import KnnMonitor, plot_held_out_cross_correlation
from .optim import create_optimizer, create_scheduler, warmup_steps_from_epochs

logger = get_logger(__name__)

ARGUMENT_TYPES = (DataArguments, ModelArguments, PretrainingArguments, OutputArguments, HubArguments)
MAX_NON_FINITE_STEPS = 10


class TrainingStopped(RuntimeError):
    """A run that cannot go on; its message says why and what was saved."""


def build_model(model_args: ModelArguments) -> BarlowTwinsForPreTraining:
    if model_args.model_name_or_path:
        return BarlowTwinsForPreTraining.from_pretrained(model_args.model_name_or_path)
    return BarlowTwinsForPreTraining(model_args.barlow_config())


def plan_steps(num_examples: int | None, data_args, train_args, num_processes: int) -> tuple[int | None, int, int]:
    """(optimizer steps per epoch or None when unknown, total steps, warm-up steps)."""
    micro_batch = train_args.per_device_train_batch_size
    steps_per_epoch = None
    if num_examples is not None:
        if data_args.max_train_samples:
            num_examples = min(num_examples, data_args.max_train_samples)
        steps_per_epoch = num_examples // num_processes // micro_batch // train_args.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ValueError(
                f"{num_examples} training examples make no full step of {micro_batch} x {num_processes} processes x "
                f"{train_args.gradient_accumulation_steps} accumulation steps; lower --per_device_train_batch_size."
            )
    if train_args.max_train_steps:
        total = train_args.max_train_steps
    elif steps_per_epoch is not None:
        total = math.ceil(train_args.num_train_epochs * steps_per_epoch)
    else:
        raise ValueError("The dataset does not say how many examples it has: pass --max_train_steps.")
    if train_args.warmup_steps is not None:
        warmup = train_args.warmup_steps
    elif steps_per_epoch is not None:
        warmup = warmup_steps_from_epochs(train_args.warmup_epochs, steps_per_epoch)
    else:
        raise ValueError("The dataset does not say how many examples it has: pass --warmup_steps.")
    if warmup > total:
        logger.warning(f"Warm-up of {warmup} steps is longer than the run ({total}); warming up over the whole run.")
        warmup = total
    return steps_per_epoch, total, warmup


def _launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_local(data_args: DataArguments) -> bool:
    return data_args.dataset_name is None or data_args.train_dir is not None or Path(data_args.dataset_name).exists()


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, train_args, out_args, hub_args = parse_arguments(ARGUMENT_TYPES, argv, description=__doc__)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    try:
        hub_args.check_token()
        with compile_settings(train_args.activation_memory_budget):
            metrics = train(data_args, model_args, train_args, out_args)
        url = hub_args.push(out_args.output_dir, data_args.dataset_name)
        if url:
            logging.getLogger(__name__).info(f"Pushed the encoder and its model card to {url}")
        return metrics
    except (ValueError, FileNotFoundError, TrainingStopped) as error:
        # Bad input and stopped runs end with their message, not a traceback.
        sys.exit(f"barlow-pretrain: error: {error}")


def compile_settings(activation_memory_budget: float | None = None) -> contextlib.AbstractContextManager:
    """torch.compile settings for the run, read when the model compiles (at its first steps)."""
    if activation_memory_budget is None:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config  # the budget is a prototype: no public name yet

    return functorch_config.patch(activation_memory_budget=activation_memory_budget)


def train(data_args: DataArguments, model_args: ModelArguments, train_args: PretrainingArguments, out_args: OutputArguments) -> dict:
    output_dir = Path(out_args.output_dir)
    accelerator = Accelerator(
        # Without a GPU, accelerate only takes several launched processes as one job (gloo) when told so.
        cpu=_launched_processes() > 1 and not torch.cuda.is_available(),
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if out_args.report_to == "none" else out_args.report_to,
        project_dir=str(output_dir),
        dynamo_backend="inductor" if train_args.torch_compile else None,
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(train_args.seed)

    # Model: BatchNorm statistics are global across processes, as the loss's are.
    model = build_model(model_args)
    config = model.config
    if accelerator.num_processes > 1:
        convert_to_global_batchnorm(model)
        left = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                       and not isinstance(m, GlobalBatchNorm)})
        if left:
            logger.warning(f"{', '.join(left)} keep per-process batch statistics: only plain BatchNorm layers are "
                           "made global, so this run is not exactly a single process with the global batch.")
    memory_format = torch.channels_last if train_args.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    # Same initial weights everywhere (above), but each process draws its own augmentations: a
    # shared stream would give every shard's i-th image the same crop, colour and blur.
    set_seed(train_args.seed + accelerator.process_index)

    # Data: each process reads its own shard of the stream; decoding and cropping in the loader.
    dataset = load_image_dataset(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_split,
        data_args.train_dir, data_args.streaming, data_args.cache_dir,
    )
    image_column = resolve_image_column(dataset, data_args.image_column)
    stream = prepare_stream(
        dataset, image_column, seed=train_args.seed, shuffle_buffer_size=data_args.shuffle_buffer_size,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        max_samples=data_args.max_train_samples,
    )
    interpolation = v2.InterpolationMode(config.interpolation)
    view_params = train_args.view_params()
    if train_args.augment_on_device:
        transform = TwoViewCropTransform(config.image_size, config.num_channels, interpolation, view_params)
        device_augment = TwoViewBatchAugmentation(config.image_mean, config.image_std, view_params).to(accelerator.device)
    else:
        transform = TwoViewTransform(
            config.image_size, config.image_mean, config.image_std, config.num_channels, interpolation, view_params
        )
        device_augment = None
    collator = TwoViewCollator(transform, image_column, config.num_channels)

    def to_views(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch -> the two model inputs on the device (augmented there if asked)."""
        view_1 = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        view_2 = batch["pixel_values_2"].to(accelerator.device, non_blocking=True)
        if device_augment is not None:
            with torch.no_grad():
                view_1, view_2 = device_augment(view_1, view_2)
        return view_1.contiguous(memory_format=memory_format), view_2.contiguous(memory_format=memory_format)

    num_examples = count_examples(dataset, data_args.train_split)
    if num_examples is None and not train_args.max_train_steps and _is_local(data_args):
        # Local files that record no size (parquet, imagefolder streams): one pass of undecoded reads.
        logger.info("Counting the training examples (the dataset records no size)...", main_process_only=True)
        num_examples = sum(1 for _ in prepare_stream(dataset, image_column, shuffle=False))
    steps_per_epoch, total_steps, warmup_steps = plan_steps(num_examples, data_args, train_args, accelerator.num_processes)
    global_batch = train_args.per_device_train_batch_size * accelerator.num_processes * train_args.gradient_accumulation_steps

    optimizer = create_optimizer(
        model, train_args.optimizer, train_args.learning_rate_weights, train_args.learning_rate_biases,
        train_args.weight_decay, global_batch, trust_coefficient=train_args.lars_trust_coefficient,
        trust_clip=train_args.lars_trust_clip,
    )
    # Stepped once per optimizer step by us: accelerate's wrapper would step it once per process.
    scheduler = create_scheduler(optimizer, total_steps, warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state = TrainerState()
    metrics: dict = {}  # the last logged window's, as metrics.json reports them
    if accelerator.is_main_process and not out_args.resume_from_checkpoint:
        (output_dir / "log_history.jsonl").unlink(missing_ok=True)
    if out_args.resume_from_checkpoint:
        path, state = load_checkpoint(accelerator, out_args.resume_from_checkpoint, output_dir)
        if accelerator.is_main_process:
            metrics = truncate_history(output_dir / "log_history.jsonl", state.global_step)
        logger.info(f"Resumed from {path} at step {state.global_step} (epoch {state.epoch}).", main_process_only=True)

    knn = KnnMonitor.create(out_args, config, accelerator) if out_args.knn_eval_dataset else None
    collapse = (RankMeMonitor.create(data_args, config, accelerator, out_args.rankme_samples, out_args.rankme_warning_threshold)
                if out_args.rankme_samples else None)
    run_config = {
        **asdict(data_args), **asdict(model_args), **asdict(train_args), **asdict(out_args),
        "global_batch_size": global_batch, "total_steps": total_steps, "warmup_steps": warmup_steps,
        "steps_per_epoch": steps_per_epoch, "num_processes": accelerator.num_processes,
    }
    accelerator.init_trackers("barlow_twins", config={k: v for k, v in run_config.items() if isinstance(v, (int, float, str, bool))})
    logger.info(
        f"Training {config.backbone} for {total_steps} steps (global batch {global_batch}, "
        f"{steps_per_epoch or 'unknown'} steps per epoch, {accelerator.num_processes} processes).",
        main_process_only=True,
    )

    def make_loader(epoch_stream, persistent: bool) -> DataLoader:
        return DataLoader(
            epoch_stream, batch_size=train_args.per_device_train_batch_size, collate_fn=collator,
            # Short batches are kept and merged by whole_batches: each worker ends an epoch with one.
            num_workers=data_args.dataloader_num_workers, drop_last=False,
            # Workers live for the whole run rather than restarting every epoch: datasets shares
            # set_epoch with them, so each epoch is still reshuffled.
            persistent_workers=persistent,
            pin_memory=accelerator.device.type == "cuda",  # lets to_views copy without blocking
            # Its own generator: creating the loader must not draw from the global RNG, or a resumed
            # run's augmentations would differ from an uninterrupted one's.
            generator=torch.Generator().manual_seed(train_args.seed + state.epoch),
        )

    epoch_loader = None
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process, desc="pretraining")
    window = {"loss": 0.0, "on": 0.0, "off": 0.0, "steps": 0, "wait": 0.0, "start": time.perf_counter()}
    non_finite_in_a_row = 0
    started = time.perf_counter()
    resumed_wall_time = state.wall_time_s

    def checkpoint() -> Path:
        state.wall_time_s = round(resumed_wall_time + time.perf_counter() - started, 2)
        return save_checkpoint(accelerator, output_dir, state, save_extra=save_loadable_config)

    def save_loadable_config(folder: Path) -> None:
        # The checkpoint's model.safetensors has the model's own keys: with the config and image
        # processor beside it, from_pretrained, barlow-eval and barlow-finetune load the folder.
        config.save_pretrained(folder)
        create_image_processor(config).save_pretrained(folder)

    model.train()

    while state.global_step < total_steps:
        # An epoch is one pass over this process's shard; resuming skips what was consumed.
        stream.set_epoch(state.epoch)
        resumed_mid_epoch = state.examples_in_epoch > 0
        if resumed_mid_epoch:  # a one-off loader over the rest of the epoch
            rest = stream.skip(state.examples_in_epoch)
            rest.set_epoch(state.epoch)  # skip() starts its copy at epoch 0
            loader = make_loader(rest, persistent=False)
        else:
            if epoch_loader is None:
                epoch_loader = make_loader(stream, persistent=data_args.dataloader_num_workers > 0)
            loader = epoch_loader
        batches = whole_batches(loader, train_args.per_device_train_batch_size)
        batches_this_epoch = 0
        while state.global_step < total_steps:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            window["wait"] += time.perf_counter() - wait_start
            has_batch = batch is not None
            has_batch, enough = all_processes(accelerator, has_batch, has_batch and batch["pixel_values"].shape[0] >= 2)
            if not has_batch:
                break
            state.examples_in_epoch += train_args.per_device_train_batch_size
            batches_this_epoch += 1
            state.skipped_images += int(batch["num_skipped"])
            if not enough:
                logger.warning("Skipping a batch with fewer than two readable images.")
                continue
            view_1, view_2 = to_views(batch)

            with accelerator.accumulate(model):
                out = model(pixel_values=view_1, pixel_values_2=view_2)
                loss_is_finite = is_finite_later(out.loss)
                accelerator.backward(out.loss)
                # Checked once the backward pass is queued (see is_finite_later). The loss is
                # global, so every process takes the same branch here.
                if not loss_is_finite():
                    non_finite_in_a_row += 1
                    # Drop the gradients, now non-finite (with those of earlier accumulation steps,
                    # summed into them): model, not optimizer, whose zero_grad accelerate skips
                    # between accumulation steps.
                    model.zero_grad(set_to_none=True)
                    logger.warning(f"Non-finite loss at step {state.global_step}; step skipped ({non_finite_in_a_row} in a row).")
                    if non_finite_in_a_row >= MAX_NON_FINITE_STEPS:
                        saved = checkpoint()
                        progress.close()
                        raise TrainingStopped(
                            f"{non_finite_in_a_row} non-finite losses in a row at step {state.global_step}; "
                            f"saved {saved}. Lower the learning rates or use --mixed_precision no."
                        )
                    continue
                non_finite_in_a_row = 0
                optimizer.step()
                optimizer.zero_grad()

            # Tensors, read at logging time: an .item() per step would wait for the device each step.
            window["loss"] += out.loss.detach()
            window["on"] += out.on_diagonal_loss.detach()
            window["off"] += out.off_diagonal_loss.detach()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.global_step += 1
            window["steps"] += 1
            progress.update(1)

            if state.global_step % out_args.logging_steps == 0 or state.global_step == total_steps:
                metrics = _log_window(accelerator, window, scheduler, state, global_batch, train_args, progress)
                if collapse is not None:  # RankMe, measured outside the window that gives images/s
                    metrics.update(collapse.measure(accelerator.unwrap_model(model, keep_torch_compile=False),
                                                    state.global_step, last=state.global_step == total_steps))
                    window["start"] = time.perf_counter()
                if accelerator.is_main_process:  # the whole history, for plots and comparisons
                    with open(output_dir / "log_history.jsonl", "a") as history:
                        history.write(json.dumps({"step": state.global_step, **metrics}) + "\n")
            if out_args.checkpointing_steps and out_args.checkpointing_steps != "epoch":
                if state.global_step % int(out_args.checkpointing_steps) == 0:
                    checkpoint()
            if knn is not None and out_args.knn_eval_steps and state.global_step % out_args.knn_eval_steps == 0:
                metrics["knn_top1"] = knn.evaluate(accelerator.unwrap_model(model).barlow_twins, state.global_step)
        else:
            break  # total_steps reached in the middle of an epoch
        # A checkpoint saved after an epoch's last batch leaves nothing of that epoch to read.
        if batches_this_epoch == 0 and not resumed_mid_epoch:
            raise TrainingStopped(f"Epoch {state.epoch} gave no batch of {train_args.per_device_train_batch_size} images.")
        state.epoch += 1
        state.examples_in_epoch = 0
        if out_args.checkpointing_steps == "epoch":
            checkpoint()
    progress.close()

    # Outputs: the model folder with its processor, arguments, metrics and the C plot.
    wall_time = time.perf_counter() - started
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if knn is not None:
        metrics["knn_top1"] = knn.evaluate(unwrapped.barlow_twins, state.global_step)
    plot_held_out_cross_correlation(unwrapped, data_args, collator, to_views, accelerator, output_dir / "cross_correlation.png")
    if out_args.checkpointing_steps:
        checkpoint()
    accelerator.wait_for_everyone()
    metrics.update(
        global_step=state.global_step, skipped_images=state.skipped_images,
        epochs=state.global_step / steps_per_epoch if steps_per_epoch else state.epoch,
        wall_time_s=round(wall_time, 2),
        # With --resume_from_checkpoint, wall_time_s is this run's part and this the whole training's.
        total_wall_time_s=round(resumed_wall_time + wall_time, 2),
    )
    if accelerator.is_main_process:
        unwrapped.save_pretrained(output_dir)
        create_image_processor(unwrapped.config).save_pretrained(output_dir)
        (output_dir / "training_args.json").write_text(json.dumps(run_config, indent=2, default=str))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"Saved the model, metrics and cross_correlation.png to {output_dir}.", main_process_only=True)
    accelerator.end_training()
    return metrics


def _log_window(accelerator, window, scheduler, state, global_batch, train_args, progress) -> dict:
    steps = max(window["steps"], 1)
    micro_steps = steps * train_args.gradient_accumulation_steps
    elapsed = time.perf_counter() - window["start"]
    metrics = {
        "train_loss": float(window["loss"]) / micro_steps,
        "on_diagonal_loss": float(window["on"]) / micro_steps,
        "off_diagonal_loss": float(window["off"]) / micro_steps,
        "lr_weights": scheduler.get_last_lr()[0],
        "lr_biases": scheduler.get_last_lr()[1],
        "images_per_second": global_batch * steps / elapsed,
        "data_wait_fraction": window["wait"] / elapsed,
        "skipped_images": state.skipped_images,
        "epoch": state.epoch,
    }
    accelerator.log(metrics, step=state.global_step)
    progress.set_postfix(loss=f"{metrics['train_loss']:.1f}", img_s=f"{metrics['images_per_second']:.0f}")
    logger.info(f"step {state.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), main_process_only=True)
    window.update(loss=0.0, on=0.0, off=0.0, steps=0, wait=0.0, start=time.perf_counter())
    return metrics


if __name__ == "__main__":
    main()
