"""barlow-finetune's body for classification (`training/finetune.py` parses the options and calls
`run_finetuning`): the model and its new head, the data, the optimizer, the loop with an evaluation
at every epoch end, and the saved classifier."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import modeling_barlow
from barlow_cli import prepare_output_dir

from ..arguments import DataArguments, HubArguments, PretrainedModelArguments, SupervisedDataArguments
from ..shared.checkpointing import append_history
from ..shared.data import is_local_source
from ..shared.distributed import create_accelerator
from ..shared.labelled_data import load_labelled_data
from ..shared.model_source import load_model_source
from ..shared.optim import create_scheduler, warmup_steps_from_epochs
from .arguments import FinetuningArguments
from .classifier import classifier_optimizer, evaluate_classifier, fit_classifier


logger = get_logger(__name__)

# What a run writes into --output_dir: an earlier run is recognised (and, with --overwrite_output_dir,
# removed) by these; the user's own files there are left alone.
RUN_FILES = (
    "config.json", "model.safetensors", "preprocessor_config.json", "training_args.json", "metrics.json",
    "log_history.jsonl", "barlow_finetune", *(path.name for path in Path(modeling_barlow.__file__).parent.glob("*.py")),
)


def run_finetuning(
    data_args: DataArguments,
    supervised_args: SupervisedDataArguments,
    model_args: PretrainedModelArguments,
    train_args: FinetuningArguments,
    hub_args: HubArguments,
) -> None:
    """barlow-finetune (classification) once its options are parsed: the output folder, the
    fine-tuning, the upload."""
    hub_args.check_token()
    prepare_output_dir(train_args.output_dir, RUN_FILES, overwrite=train_args.overwrite_output_dir)
    finetune(data_args, supervised_args, model_args, train_args)
    url = hub_args.push(train_args.output_dir)
    if url:
        logging.getLogger(__name__).info(f"Pushed the classifier and its model card to {url}")


def finetune(
    data_args: DataArguments,
    supervised_args: SupervisedDataArguments,
    model_args: PretrainedModelArguments,
    train_args: FinetuningArguments,
) -> dict:
    output_dir = Path(train_args.output_dir)
    accelerator = create_accelerator(
        mixed_precision=train_args.mixed_precision,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_dir=str(output_dir),
    )
    set_seed(train_args.seed)

    # Model: the pretrained encoder and a new head named after the dataset's classes.
    pretrained = load_model_source(model_args.model_name_or_path, model_args.random_init, train_args.seed)
    data = load_labelled_data(data_args, supervised_args)
    model, head = pretrained.classifier(data.label_names)
    if train_args.freeze_backbone:
        if not hasattr(model, "freeze_backbone"):
            raise ValueError(f"--freeze_backbone needs a Barlow Twins model; {type(model).__name__} has no freeze_backbone().")
        model.freeze_backbone()

    # Data: this process's share of the training stream, new crops and order every epoch.
    train_transform = pretrained.train_transform(supervised_args.min_crop_scale)
    batch_size = train_args.per_device_train_batch_size

    # Both loaders keep their workers for the whole run (no restart at every epoch and evaluation).
    on_cuda = accelerator.device.type == "cuda"
    make_loader = data.epoch_loaders(
        "train", train_transform, pretrained.num_channels, batch_size, seed=train_args.seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size, num_workers=data_args.dataloader_num_workers,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes, pin_memory=on_cuda,
    )
    eval_loader = data.loader(
        "eval", pretrained.eval_transform(), pretrained.num_channels, supervised_args.per_device_eval_batch_size,
        num_workers=data_args.dataloader_num_workers, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, pin_memory=on_cuda, persistent_workers=True,
    )
    num_examples = data.num_examples("train")
    steps_per_epoch = max(1, math.ceil(num_examples / (batch_size * accelerator.num_processes)))
    total_steps = math.ceil(train_args.num_train_epochs * steps_per_epoch)
    warmup_steps = min(warmup_steps_from_epochs(train_args.warmup_epochs, steps_per_epoch), total_steps)

    # Optimizer: the head and the backbone each with their own learning rate; per-step cosine.
    optimizer = classifier_optimizer(
        model, head, train_args.optimizer, train_args.learning_rate, train_args.head_learning_rate, train_args.weight_decay
    )
    scheduler = create_scheduler(optimizer, total_steps, warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    run_config = {
        **asdict(data_args), **asdict(supervised_args), **asdict(model_args), **asdict(train_args),
        "dataset_is_local": is_local_source(data_args.dataset_name, data_args.train_dir),
        "num_examples_in_split": num_examples, "num_classes": data.num_classes, "label_names": data.label_names,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup_steps,
        "num_processes": accelerator.num_processes,
    }
    accelerator.init_trackers("barlow_finetune", config={k: v for k, v in run_config.items() if isinstance(v, (int, float, str, bool))})
    logger.info(
        f"Fine-tuning {pretrained.name} on {num_examples} images of {data.num_classes} classes for {total_steps} steps "
        f"({steps_per_epoch} per epoch, {accelerator.num_processes} processes).", main_process_only=True,
    )

    # Loop: train, and evaluate at every epoch end.
    progress = tqdm(total=total_steps, disable=not accelerator.is_local_main_process, desc="fine-tuning")
    window = {"loss": 0.0, "steps": 0, "epoch_loss": 0.0, "epoch_steps": 0}
    history: list[dict] = []
    if accelerator.is_main_process:
        (output_dir / "log_history.jsonl").unlink(missing_ok=True)

    def on_step(step: int, loss: torch.Tensor) -> None:
        # Losses add up on the device; reading one (.item()) waits for the accelerator, so only
        # logging does it.
        progress.update(1)
        for key, value in (("loss", loss), ("steps", 1)):
            window[key] = window[key] + value
            window[f"epoch_{key}"] = window[f"epoch_{key}"] + value
        if step % train_args.logging_steps == 0:
            entry = {"train_loss": float(window["loss"]) / window["steps"]}
            entry.update({f"lr_{g['name'].split('_')[0]}": g["lr"] for g in scheduler.optimizer.param_groups})
            accelerator.log(entry, step=step)
            append_history(output_dir, {"step": step, **entry}, accelerator)
            progress.set_postfix(loss=f"{entry['train_loss']:.3f}")
            window.update(loss=0.0, steps=0)

    def on_epoch_end(epoch: int, step: int) -> None:
        result = evaluate_classifier(model, eval_loader, data.num_classes, accelerator=accelerator)
        entry = {"epoch": epoch + 1, "step": step, **{f"eval_{k}": v for k, v in result.items()}}
        if window["epoch_steps"]:  # the mean over this epoch's steps
            entry["train_loss"] = float(window["epoch_loss"]) / window["epoch_steps"]
        window.update(epoch_loss=0.0, epoch_steps=0)
        history.append(entry)
        accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=step)
        append_history(output_dir, entry, accelerator)
        logger.info(", ".join(f"{k} {v:.4g}" for k, v in entry.items()), main_process_only=True)

    started = time.perf_counter()
    fitted = fit_classifier(
        model, optimizer, scheduler, make_loader, total_steps, accelerator=accelerator, on_step=on_step,
        on_epoch_end=on_epoch_end,
    )
    progress.close()
    # The images trained on: one pass over every process's share, unreadable files left out.
    counts = torch.tensor([fitted.readable_images, fitted.skipped_images], device=accelerator.device)
    readable, skipped = accelerator.reduce(counts, reduction="sum").tolist()

    # Save: a folder for from_pretrained and the image-classification pipeline, and the metrics.
    accelerator.wait_for_everyone()
    final = history[-1]
    metrics = {
        **{k: v for k, v in final.items() if k.startswith("eval_")},
        "train_loss": final.get("train_loss"), "epochs": final["epoch"], "global_step": fitted.steps,
        "num_train_examples": readable, "skipped_images": skipped, "eval_split": data.eval_split,
        "wall_time_s": round(time.perf_counter() - started, 2), "history": history,
    }
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir)
        pretrained.processor.save_pretrained(output_dir)
        (output_dir / "training_args.json").write_text(json.dumps(run_config, indent=2, default=str))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"Saved the classifier, its image processor and metrics.json to {output_dir}.", main_process_only=True)
    accelerator.end_training()
    return metrics

