"""Evaluate a pretrained encoder: linear probe, kNN and semi-supervised fine-tuning.

    barlow-eval --model_name_or_path out --protocol linear knn semi --output_dir eval
    python -m training.evaluate --model_name_or_path out --output_dir eval   # digits, linear and kNN

Writes eval_results.json (accuracies as fractions) into --output_dir and prints a table. Features
are computed once per model, data and preprocessing, and cached on disk.

* linear: the backbone frozen in eval mode. `--linear_solver sgd` (default) is the paper's
  protocol on features computed once (SGD, momentum 0.9, lr 0.3, weight decay 1e-6, batch 256,
  100 epochs, per-step cosine, head N(0, 0.01)); `lbfgs` fits an exact logistic regression on
  standardised features; `--linear_augment` trains on random resized crops and flips of the
  images at every epoch instead (the full protocol; no cache).
* knn: cosine similarity of L2-normalised features, the k nearest vote with exp(sim / T).
* semi: the whole network fine-tuned on class-balanced fractions of the labels (chosen with
  `--seed`), backbone and head with their own learning rates.

Exit status: 0 done, 1 failed, 2 usage error.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from barlow_cli import UsageError, parse_arguments, prepare_output_dir, run_command, setup_logging

from .arguments import DataArguments
from .classifier_arguments import EvaluationArguments, PretrainedModelArguments, SupervisedDataArguments
from .collective import create_accelerator, launched_processes
from .features import extract_features, knn_topk_accuracy
from .optim import create_scheduler
from .classifier_training import classifier_optimizer, evaluate_classifier, fit_classifier
from .labelled_data import check_label_range, class_balanced_subset, fraction_name, load_labelled_data
from .model_source import load_model_source
from .metrics import topk_accuracy
from .probes import cached_features, exact_linear_probe, fit_linear_head, linear_head, sgd_linear_probe


logger = logging.getLogger(__name__)

ARGUMENT_TYPES = (DataArguments, SupervisedDataArguments, PretrainedModelArguments, EvaluationArguments)
RESULTS_FILE = "eval_results.json"
RUN_FILES = (RESULTS_FILE,)  # an earlier evaluation in --output_dir


def default_feature_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "barlow_twins" / "features"


def main(argv: list[str] | None = None) -> None:
    data_args, supervised_args, model_args, eval_args = parse_arguments(ARGUMENT_TYPES, argv, description=__doc__)
    setup_logging()

    def run() -> None:
        prepare_output_dir(eval_args.output_dir, RUN_FILES, overwrite=eval_args.overwrite_output_dir)
        evaluate(data_args, supervised_args, model_args, eval_args)

    run_command("barlow-eval", run)


def evaluate(
    data_args: DataArguments,
    supervised_args: SupervisedDataArguments,
    model_args: PretrainedModelArguments,
    eval_args: EvaluationArguments,
) -> dict:
    if launched_processes() > 1:
        raise UsageError("barlow-eval runs in a single process: start it without accelerate launch or torchrun.")
    started = time.perf_counter()
    accelerator = create_accelerator(mixed_precision=eval_args.mixed_precision)
    device = accelerator.device
    set_seed(eval_args.seed)
    output_dir = Path(eval_args.output_dir)

    # Model and data.
    model = load_model_source(model_args.model_name_or_path, model_args.random_init, eval_args.seed)
    data = load_labelled_data(data_args, supervised_args)
    protocols = eval_args.protocol
    logger.info(
        f"Evaluating {model.name}{' (random init)' if model.random_init else ''}: {', '.join(protocols)} on "
        f"{data.identity['source']} ({data.train_split} -> {data.eval_split}, {data.num_classes} classes)."
    )
    encoders: list = []

    def encoder():  # loaded once, and only when features are not all cached
        if not encoders:
            encoders.append(model.encoder().to(device))
        return encoders[0]

    # Features, computed once per (model, data, preprocessing) and cached on disk.
    cache_dir = (eval_args.feature_cache_dir or default_feature_cache_dir()) if eval_args.cache_features else None
    features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    cache_hits: dict[str, bool] = {}
    needed = []
    if "knn" in protocols or ("linear" in protocols and not eval_args.linear_augment):
        needed.append("train")
    if "knn" in protocols or "linear" in protocols:
        needed.append("eval")
    for split in needed:
        x, y, hit = cached_features(
            encoder, model, data, split, batch_size=supervised_args.per_device_eval_batch_size, device=device,
            cache_dir=cache_dir, num_workers=data_args.dataloader_num_workers, autocast=accelerator.autocast,
        )
        features[split], cache_hits[split] = (x, y), hit
        check_label_range(y, data.num_classes, split)

    metrics: dict[str, float] = {}
    settings: dict[str, dict] = {}
    rows: list[tuple[str, dict, str]] = []

    # Linear probe.
    if "linear" in protocols:
        eval_x, eval_y = features["eval"]
        if eval_args.linear_augment:
            scores = _augmented_linear_probe(
                encoder(), model, data, data_args, supervised_args, eval_args, eval_x, device, accelerator
            )
            how = f"sgd on augmented images, {eval_args.linear_epochs} epochs"
        elif eval_args.linear_solver == "sgd":
            train_x, train_y = features["train"]
            scores = sgd_linear_probe(
                train_x, train_y, eval_x, data.num_classes, epochs=eval_args.linear_epochs,
                batch_size=eval_args.per_device_train_batch_size, learning_rate=eval_args.linear_learning_rate,
                weight_decay=eval_args.linear_weight_decay, seed=eval_args.seed, device=device,
            )
            how = f"sgd on cached features, {eval_args.linear_epochs} epochs, lr {eval_args.linear_learning_rate:g}"
        else:
            scores = exact_linear_probe(*features["train"], eval_x, data.num_classes)
            how = "exact logistic regression (L-BFGS) on standardised features"
        result = topk_accuracy(scores, eval_y)
        _record(metrics, "linear", result)
        rows.append(("linear", result, how))
        settings["linear"] = {
            "solver": eval_args.linear_solver, "augment": eval_args.linear_augment, "epochs": eval_args.linear_epochs,
            "learning_rate": eval_args.linear_learning_rate, "weight_decay": eval_args.linear_weight_decay,
            "batch_size": eval_args.per_device_train_batch_size,
        }

    # kNN.
    if "knn" in protocols:
        result = knn_topk_accuracy(
            *features["train"], *features["eval"], num_classes=data.num_classes, k=eval_args.knn_k,
            temperature=eval_args.knn_temperature,
        )
        _record(metrics, "knn", result)
        rows.append(("knn", result, f"k={eval_args.knn_k}, T={eval_args.knn_temperature:g}, cosine"))
        settings["knn"] = {"k": eval_args.knn_k, "temperature": eval_args.knn_temperature}

    # Semi-supervised: fine-tune everything on a class-balanced fraction of the labels.
    if "semi" in protocols:
        settings["semi"] = {
            "epochs": eval_args.semi_epochs, "backbone_learning_rate": eval_args.semi_backbone_learning_rate,
            "head_learning_rate": eval_args.semi_head_learning_rate, "weight_decay": eval_args.semi_weight_decay,
            "batch_size": eval_args.per_device_train_batch_size, "seed": eval_args.seed, "labelled_examples": {},
        }
        train_labels = data.labels("train")
        eval_loader = data.loader(
            "eval", model.eval_transform(), model.num_channels, supervised_args.per_device_eval_batch_size,
            num_workers=data_args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
            persistent_workers=True,  # one pass per label fraction
        )
        for fraction in eval_args.label_fraction:
            indices = class_balanced_subset(train_labels, fraction, eval_args.seed)
            result = _semi_supervised(model, data, data_args, supervised_args, eval_args, indices, eval_loader, accelerator)
            name = f"semi_{fraction_name(fraction)}"
            _record(metrics, name, result)
            rows.append((name, result, f"{len(indices)} labelled images, {eval_args.semi_epochs} epochs"))
            settings["semi"]["labelled_examples"][fraction_name(fraction)] = len(indices)

    # Metrics JSON and the table.
    results = {
        **metrics,
        "model_name_or_path": model.name,
        "random_init": model.random_init,
        "dataset": data.identity["source"],
        "train_split": data.train_split,
        "eval_split": data.eval_split,
        "num_classes": data.num_classes,
        "num_train_examples": len(features["train"][1]) if "train" in features else len(data.labels("train")),
        "num_eval_examples": len(features["eval"][1]) if "eval" in features else None,
        "feature_cache_hits": cache_hits,
        "settings": settings,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    print(format_table(rows, results))
    logger.info(f"Wrote {output_dir / RESULTS_FILE}.")
    accelerator.end_training()
    return results


def _record(metrics: dict, name: str, result: dict) -> None:
    for key, value in result.items():
        metrics[f"{name}_{key}"] = value


def _augmented_linear_probe(
    encoder, model, data, data_args, supervised_args, eval_args, eval_features, device, accelerator
) -> torch.Tensor:
    """The paper's full linear protocol: every epoch, new random resized crops and flips of the
    training images go through the frozen encoder (eval mode) into the head."""
    generator = torch.Generator().manual_seed(eval_args.seed)
    head = linear_head(eval_features.shape[1], data.num_classes, generator).to(device)
    transform = model.train_transform(supervised_args.min_crop_scale)
    batch_size = eval_args.per_device_train_batch_size
    steps_per_epoch = math.ceil(data.num_examples("train") / batch_size)

    make_loader = data.epoch_loaders(
        "train", transform, model.num_channels, batch_size, seed=eval_args.seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size, num_workers=data_args.dataloader_num_workers,
        pin_memory=device.type == "cuda",
    )

    def batches(epoch: int):
        for batch in make_loader(epoch):
            with accelerator.autocast():
                x, y = extract_features(encoder, [batch], device)
            if len(y):
                yield x.to(device), y.to(device)

    fit_linear_head(head, batches, eval_args.linear_epochs, steps_per_epoch, eval_args.linear_learning_rate,
                    eval_args.linear_weight_decay)
    with torch.no_grad():
        return head(eval_features.to(device)).cpu()


def _semi_supervised(model, data, data_args, supervised_args, eval_args, indices, eval_loader, accelerator) -> dict:
    set_seed(eval_args.seed)
    classifier, head = model.classifier(data.label_names)
    optimizer = classifier_optimizer(
        classifier, head, "sgd", eval_args.semi_backbone_learning_rate, eval_args.semi_head_learning_rate,
        eval_args.semi_weight_decay,
    )
    batch_size = eval_args.per_device_train_batch_size
    total_steps = eval_args.semi_epochs * math.ceil(len(indices) / batch_size)
    scheduler = create_scheduler(optimizer, total_steps, 0)
    classifier, optimizer = accelerator.prepare(classifier, optimizer)
    transform = model.train_transform(supervised_args.min_crop_scale)

    make_loader = data.epoch_loaders(
        "train", transform, model.num_channels, batch_size, seed=eval_args.seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size, num_workers=data_args.dataloader_num_workers,
        indices=indices, pin_memory=accelerator.device.type == "cuda",
    )
    fit_classifier(classifier, optimizer, scheduler, make_loader, total_steps, accelerator=accelerator)
    result = evaluate_classifier(classifier, eval_loader, data.num_classes, accelerator=accelerator)
    accelerator.free_memory()
    return result


def format_table(rows: list[tuple[str, dict, str]], results: dict) -> str:
    """The metrics as a plain-text table (accuracies in percent)."""
    lines = [
        f"{results['model_name_or_path']}{' (random init)' if results['random_init'] else ''} on {results['dataset']}: "
        f"{results['num_classes']} classes, {results['train_split']} -> {results['eval_split']}",
        f"{'protocol':<16} {'top-1':>7} {'top-5':>7}  settings",
    ]
    for name, result, how in rows:
        top5 = f"{100 * result['top5']:6.2f}%" if "top5" in result else f"{'-':>7}"
        lines.append(f"{name:<16} {100 * result['top1']:6.2f}% {top5}  {how}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
