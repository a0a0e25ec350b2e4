"""Fine-tune a pretrained encoder for object detection (DETR) or semantic segmentation (UperNet).

    barlow-finetune --task object-detection --model_name_or_path out --dataset_name <id or folder> --output_dir det
    barlow-finetune --task semantic-segmentation --model_name_or_path out --dataset_name <id or folder> --output_dir seg

Data in HF's formats: for detection an image column and `objects` ('bbox' in pixels, COCO's
[x_min, y_min, width, height] by default, and 'category'); for segmentation an image column and a
mask column (one class id per pixel). The model is transformers' DETR or UperNet with the encoder
(a barlow-pretrain folder, a saved encoder or classifier, or a timm-format export) loaded as its
backbone; `--random_init` trains the same architecture from timm's initialisation instead. Every
epoch ends with mAP (COCO protocol; torchmetrics with pycocotools) or mIoU (torchmetrics) on the
held-out split. The output folder loads in transformers' `object-detection` or
`image-segmentation` pipeline once `modeling_barlow` is imported.

Reads top to bottom like HF's `run_*_no_trainer.py`: arguments, accelerator, data, model,
optimizer, loop, save. Run with `--help` for every option.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from barlow_cli import parse_arguments, prepare_output_dir, run_command, setup_logging

from ...arguments import DataArguments, HubArguments, PretrainedModelArguments
from ...shared.checkpointing import append_history
from ...shared.distributed import all_processes, create_accelerator
from ...shared.optim import create_scheduler, warmup_steps_from_epochs
from ..classifier import classifier_optimizer
from .arguments import DenseFinetuningArguments, DenseTaskArguments
from .data import DetectionCollator, SegmentationCollator, detection_transform, load_dense_data, segmentation_transform
from .metrics import evaluate_detection, evaluate_segmentation
from .models import build_dense_model

logger = get_logger(__name__)

ARGUMENT_TYPES = (DenseTaskArguments, DataArguments, PretrainedModelArguments, DenseFinetuningArguments, HubArguments)
RUN_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "metrics.json", "training_args.json",
             "log_history.jsonl")


def main(argv: list[str] | None = None) -> None:
    task_args, data_args, model_args, train_args, hub_args = parse_arguments(ARGUMENT_TYPES, argv, description=__doc__)
    setup_logging()

    def run() -> None:
        hub_args.check_token()
        finetune_dense(task_args, data_args, model_args, train_args)
        url = hub_args.push_as_saved(train_args.output_dir)
        if url:
            logging.getLogger(__name__).info(f"Pushed the {task_args.task} model to {url}")

    run_command("barlow-finetune", run)


def finetune_dense(task_args: DenseTaskArguments, data_args: DataArguments, model_args: PretrainedModelArguments,
                   train_args: DenseFinetuningArguments) -> dict:
    output_dir = prepare_output_dir(train_args.output_dir, RUN_FILES, overwrite=train_args.overwrite_output_dir)
    accelerator = create_accelerator(
        mixed_precision=train_args.mixed_precision,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_dir=str(output_dir),
    )
    set_seed(train_args.seed)
    detection = task_args.task == "object-detection"

    # Data: the splits, their annotation columns and class names.
    data = load_dense_data(data_args, task_args)

    # Model: DETR or UperNet with the encoder as its backbone, weights checked after building.
    dense = build_dense_model(
        task_args.task, model_args.model_name_or_path, data.id2label, image_size=task_args.image_size,
        out_indices=task_args.out_indices, head_config=task_args.head_config_dict(), random_init=model_args.random_init,
        seed=train_args.seed,
    )
    model, size, config = dense.model, dense.backbone_config.image_size, dense.backbone_config
    if train_args.freeze_backbone:
        dense.backbone.requires_grad_(False)

    # Loaders: image and annotation transformed together; workers live for the whole run.
    mean, std = config.image_mean, config.image_std
    if detection:
        make_collate = lambda train: DetectionCollator(  # noqa: E731
            detection_transform(size, mean, std, train, task_args.min_crop_scale), data.image_column,
            data.annotation_column, len(data.label_names), data.bbox_format)
    else:
        make_collate = lambda train: SegmentationCollator(  # noqa: E731
            segmentation_transform(size, mean, std, train, task_args.min_crop_scale), data.image_column,
            data.annotation_column)
    loader_options = {"num_workers": data_args.dataloader_num_workers, "process_index": accelerator.process_index,
                      "num_processes": accelerator.num_processes, "pin_memory": accelerator.device.type == "cuda"}
    train_loader = data.loader("train", make_collate(True), train_args.per_device_train_batch_size, shuffle=True,
                               seed=train_args.seed, shuffle_buffer_size=data_args.shuffle_buffer_size, **loader_options)
    eval_loader = data.loader("eval", make_collate(False), task_args.per_device_eval_batch_size, **loader_options)
    num_examples = data.num_examples("train")
    steps_per_epoch = max(1, math.ceil(num_examples / (train_args.per_device_train_batch_size * accelerator.num_processes)))
    total_steps = math.ceil(train_args.num_train_epochs * steps_per_epoch)
    warmup_steps = min(warmup_steps_from_epochs(train_args.warmup_epochs, steps_per_epoch), total_steps)

    # Optimizer: the backbone at --learning_rate, everything else at --head_learning_rate.
    head = SimpleNamespace(parameters=dense.head_parameters)
    optimizer = classifier_optimizer(model, head, train_args.optimizer, train_args.learning_rate,
                                     train_args.head_learning_rate, train_args.weight_decay)
    scheduler = create_scheduler(optimizer, total_steps, warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    run_config = {
        **asdict(task_args), **asdict(data_args), **asdict(model_args), **asdict(train_args),
        "label_names": data.label_names, "image_column": data.image_column, "annotation_column": data.annotation_column,
        "image_size": size, "out_indices": config.out_indices, "num_train_examples": num_examples,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup_steps,
        "num_processes": accelerator.num_processes,
    }
    accelerator.init_trackers("barlow_finetune_dense", config={k: v for k, v in run_config.items()
                                                                if isinstance(v, (int, float, str, bool))})
    logger.info(
        f"Fine-tuning {type(accelerator.unwrap_model(model)).__name__} on {model_args.model_name_or_path}"
        f"{' (random init)' if model_args.random_init else ''}: {num_examples} images, {len(data.label_names)} classes, "
        f"{total_steps} steps ({steps_per_epoch} per epoch) at {size} px.", main_process_only=True,
    )

    def evaluate() -> dict[str, float]:
        if detection:
            return evaluate_detection(model, eval_loader, dense.processor, accelerator=accelerator)
        return evaluate_segmentation(model, eval_loader, len(data.label_names), data.ignore_index, accelerator=accelerator)

    # Loop: train, and evaluate at every epoch end.
    if accelerator.is_main_process:
        (output_dir / "log_history.jsonl").unlink(missing_ok=True)
    progress = tqdm(total=total_steps, disable=not accelerator.is_local_main_process, desc=f"fine-tuning ({task_args.task})")
    history: list[dict] = []
    step, epoch, window, readable, skipped = 0, 0, [], 0, 0
    started = time.perf_counter()
    while step < total_steps:
        model.train()
        if train_args.freeze_backbone:
            dense.backbone.eval()
        train_loader.dataset.set_epoch(epoch)
        batches, epoch_losses = iter(train_loader), []
        while step < total_steps:
            batch = next(batches, None)
            has_batch = batch is not None
            has_batch, enough = all_processes(accelerator, has_batch, has_batch and batch["pixel_values"].shape[0] >= 2)
            if not has_batch:
                break
            if epoch == 0:  # an image's fate is the same every epoch: count it once
                readable += batch["pixel_values"].shape[0]
                skipped += int(batch["num_skipped"])
            if not enough:  # BatchNorm needs 2 images
                continue
            pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            labels = batch["labels"]
            labels = [{k: v.to(accelerator.device) for k, v in t.items()} for t in labels] if detection \
                else labels.to(accelerator.device)
            with accelerator.autocast():
                loss = model(pixel_values=pixel_values, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if train_args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            progress.update(1)
            window.append(loss.detach())
            epoch_losses.append(loss.detach())
            if step % train_args.logging_steps == 0:
                entry = {"step": step, "train_loss": float(torch.stack(window).mean()),
                         **{f"lr_{g['name'].split('_')[0]}": g["lr"] for g in optimizer.param_groups}}
                accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=step)
                append_history(output_dir, entry, accelerator)
                progress.set_postfix(loss=f"{entry['train_loss']:.3f}")
                window = []
        if not epoch_losses:
            raise ValueError("An epoch produced no training batch of 2 or more readable images.")
        result = evaluate()
        entry = {"epoch": epoch + 1, "step": step, "train_loss": float(torch.stack(epoch_losses).mean()),
                 **{f"eval_{k}": v for k, v in result.items()}}
        history.append(entry)
        accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=step)
        append_history(output_dir, entry, accelerator)
        logger.info(", ".join(f"{k} {v:.4g}" for k, v in entry.items()), main_process_only=True)
        epoch += 1
    progress.close()

    # Save: a folder for from_pretrained and the pipeline, and the metrics.
    accelerator.wait_for_everyone()
    final = history[-1]
    counts = torch.tensor([readable, skipped], device=accelerator.device)
    readable, skipped = accelerator.reduce(counts, reduction="sum").tolist()
    metrics = {
        **{k: v for k, v in final.items() if k.startswith("eval_")}, "train_loss": final["train_loss"],
        "epochs": final["epoch"], "global_step": step, "num_train_examples": readable,
        "skipped_images": skipped, "eval_split": data.eval_split, "random_init": model_args.random_init,
        "wall_time_s": round(time.perf_counter() - started, 2), "history": history,
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output_dir)
        dense.processor.save_pretrained(output_dir)
        (output_dir / "training_args.json").write_text(json.dumps(run_config, indent=2, default=str))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info(f"Saved the {task_args.task} model, its image processor and metrics.json to {output_dir}.",
                    main_process_only=True)
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
