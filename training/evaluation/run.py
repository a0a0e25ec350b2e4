"""barlow-eval's body (`training/evaluate.py` parses the options and calls `run_evaluation`): the
model and labelled data, cached features, then each protocol (linear, kNN, semi-supervised) and the
table of results."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import set_seed

from barlow_cli import UsageError, prepare_output_dir

from ..arguments import DataArguments, PretrainedModelArguments, SupervisedDataArguments
from ..finetuning import classifier_optimizer, evaluate_classifier, fit_classifier
from ..shared.distributed import create_accelerator, launched_processes
from ..shared.labelled_data import LabelledData, check_label_range, class_balanced_subset, fraction_name, load_labelled_data
from ..shared.metrics import summarise_seeds, topk_accuracy
from ..shared.model_source import ModelSource, load_model_source
from ..shared.optim import create_scheduler
from .arguments import EvaluationArguments
from .features import extract_features, knn_topk_accuracy
from .probes import cached_features, exact_linear_probe, fit_linear_head, linear_head, sgd_linear_probe


logger = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
RUN_FILES = (RESULTS_FILE,)  # an earlier evaluation in --output_dir


def default_feature_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "barlow_twins" / "features"


def run_evaluation(
    data_args: DataArguments,
    supervised_args: SupervisedDataArguments,
    model_args: PretrainedModelArguments,
    eval_args: EvaluationArguments,
) -> None:
    """barlow-eval once its options are parsed: the output folder, then the evaluation."""
    prepare_output_dir(eval_args.output_dir, RUN_FILES, overwrite=eval_args.overwrite_output_dir)
    evaluate(data_args, supervised_args, model_args, eval_args)


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
    seeds = eval_args.seeds or [eval_args.seed]
    set_seed(seeds[0])
    output_dir = Path(eval_args.output_dir)

    # Model and data.
    model = load_model_source(model_args.model_name_or_path, model_args.random_init, seeds[0])
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

    # Every probe once per seed. kNN has no randomness given the features: computed once, it is
    # the same in every seed's run. The linear probes and fine-tuning draw from their seed.
    settings = _settings(eval_args, protocols, seeds)
    knn = None
    if "knn" in protocols:
        knn = knn_topk_accuracy(
            *features["train"], *features["eval"], num_classes=data.num_classes, k=eval_args.knn_k,
            temperature=eval_args.knn_temperature,
        )
    eval_loader = None
    if "semi" in protocols:
        eval_loader = data.loader(
            "eval", model.eval_transform(), model.num_channels, supervised_args.per_device_eval_batch_size,
            num_workers=data_args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
            persistent_workers=True,  # one pass per label fraction and seed
        )
    runs: list[dict[str, dict]] = []  # per seed: protocol name -> {"top1", "top5"}
    how: dict[str, str] = {}
    for seed in seeds:
        run: dict[str, dict] = {}
        if "linear" in protocols:
            run["linear"], how["linear"] = _linear_probe(
                seed, encoder, model, data, data_args, supervised_args, eval_args, features, device, accelerator
            )
        if knn is not None:
            run["knn"], how["knn"] = knn, f"k={eval_args.knn_k}, T={eval_args.knn_temperature:g}, cosine"
        if "semi" in protocols:
            train_labels = data.labels("train")
            for fraction in eval_args.label_fraction:
                indices = class_balanced_subset(train_labels, fraction, seed)
                name = f"semi_{fraction_name(fraction)}"
                run[name] = _semi_supervised(
                    seed, model, data, data_args, supervised_args, eval_args, indices, eval_loader, accelerator
                )
                how[name] = f"{len(indices)} labelled images, {eval_args.semi_epochs} epochs"
                settings["semi"]["labelled_examples"][fraction_name(fraction)] = len(indices)
        runs.append(run)
    per_seed = [{f"{name}_{k}": v for name, result in run.items() for k, v in result.items()} for run in runs]
    if len(seeds) == 1:
        metrics, seed_record = per_seed[0], {}
    else:
        metrics = summarise_seeds(per_seed)
        seed_record = {"seeds": seeds, "per_seed": {key: [run[key] for run in per_seed] for key in per_seed[0]}}
    rows = [(name, _row_values(metrics, name, len(seeds)), how[name]) for name in runs[0]]

    # Metrics JSON and the table.
    results = {
        **metrics,
        **seed_record,
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


def _settings(eval_args: EvaluationArguments, protocols: list[str], seeds: list[int]) -> dict[str, dict]:
    """The settings of each protocol, as recorded in eval_results.json."""
    settings: dict[str, dict] = {}
    if "linear" in protocols:
        settings["linear"] = {
            "solver": eval_args.linear_solver, "augment": eval_args.linear_augment, "epochs": eval_args.linear_epochs,
            "learning_rate": eval_args.linear_learning_rate, "weight_decay": eval_args.linear_weight_decay,
            "batch_size": eval_args.per_device_train_batch_size,
        }
    if "knn" in protocols:
        settings["knn"] = {"k": eval_args.knn_k, "temperature": eval_args.knn_temperature}
    if "semi" in protocols:
        settings["semi"] = {
            "epochs": eval_args.semi_epochs, "backbone_learning_rate": eval_args.semi_backbone_learning_rate,
            "head_learning_rate": eval_args.semi_head_learning_rate, "weight_decay": eval_args.semi_weight_decay,
            "batch_size": eval_args.per_device_train_batch_size,
            **({"seed": seeds[0]} if len(seeds) == 1 else {"seeds": seeds}), "labelled_examples": {},
        }
    return settings


def _linear_probe(
    seed: int, encoder: Callable[[], torch.nn.Module], model: ModelSource, data: LabelledData, data_args: DataArguments,
    supervised_args: SupervisedDataArguments, eval_args: EvaluationArguments,
    features: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device, accelerator,
) -> tuple[dict, str]:
    """The linear protocol chosen by ``eval_args`` with ``seed``: (accuracies, how it was fitted)."""
    eval_x, eval_y = features["eval"]
    if eval_args.linear_augment:  # new crops every epoch: the encoder runs again for each seed
        scores = _augmented_linear_probe(
            seed, encoder(), model, data, data_args, supervised_args, eval_args, eval_x, device, accelerator
        )
        how = f"sgd on augmented images, {eval_args.linear_epochs} epochs"
    elif eval_args.linear_solver == "sgd":
        train_x, train_y = features["train"]
        scores = sgd_linear_probe(
            train_x, train_y, eval_x, data.num_classes, epochs=eval_args.linear_epochs,
            batch_size=eval_args.per_device_train_batch_size, learning_rate=eval_args.linear_learning_rate,
            weight_decay=eval_args.linear_weight_decay, seed=seed, device=device,
        )
        how = f"sgd on cached features, {eval_args.linear_epochs} epochs, lr {eval_args.linear_learning_rate:g}"
    else:  # a deterministic fit: every seed gives the same result
        scores = exact_linear_probe(*features["train"], eval_x, data.num_classes)
        how = "exact logistic regression (L-BFGS) on standardised features"
    return topk_accuracy(scores, eval_y), how


def _row_values(metrics: dict[str, float], name: str, num_seeds: int) -> dict[str, float]:
    """One table row's numbers: {"top1", "top5"}, and with several seeds their "_std" and "_min" too."""
    suffixes = ("", "_std", "_min") if num_seeds > 1 else ("",)
    return {f"{k}{suffix}": metrics[f"{name}_{k}{suffix}"] for k in ("top1", "top5") if f"{name}_{k}" in metrics
            for suffix in suffixes}


def _augmented_linear_probe(
    seed: int, encoder, model, data, data_args, supervised_args, eval_args, eval_features, device, accelerator
) -> torch.Tensor:
    """The paper's full linear protocol: every epoch, new random resized crops and flips of the
    training images go through the frozen encoder (eval mode) into the head."""
    generator = torch.Generator().manual_seed(seed)
    head = linear_head(eval_features.shape[1], data.num_classes, generator).to(device)
    transform = model.train_transform(supervised_args.min_crop_scale)
    batch_size = eval_args.per_device_train_batch_size
    steps_per_epoch = math.ceil(data.num_examples("train") / batch_size)

    make_loader = data.epoch_loaders(
        "train", transform, model.num_channels, batch_size, seed=seed,
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


def _semi_supervised(seed: int, model, data, data_args, supervised_args, eval_args, indices, eval_loader, accelerator) -> dict:
    set_seed(seed)
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
        "train", transform, model.num_channels, batch_size, seed=seed,
        shuffle_buffer_size=data_args.shuffle_buffer_size, num_workers=data_args.dataloader_num_workers,
        indices=indices, pin_memory=accelerator.device.type == "cuda",
    )
    fit_classifier(classifier, optimizer, scheduler, make_loader, total_steps, accelerator=accelerator)
    result = evaluate_classifier(classifier, eval_loader, data.num_classes, accelerator=accelerator)
    accelerator.free_memory()
    return result


def format_table(rows: list[tuple[str, dict, str]], results: dict) -> str:
    """The metrics as a plain-text table (accuracies in percent); over several seeds, each is
    their mean ± sample standard deviation, and the minimum."""
    seeds = results.get("seeds")
    lines = [
        f"{results['model_name_or_path']}{' (random init)' if results['random_init'] else ''} on {results['dataset']}: "
        f"{results['num_classes']} classes, {results['train_split']} -> {results['eval_split']}"
        + (f", seeds {' '.join(map(str, seeds))} (mean ± std, min)" if seeds else ""),
    ]
    width = 22 if seeds else 7

    def cell(result: dict, k: str) -> str:
        if k not in result:
            return f"{'-':>{width}}"
        if not seeds:
            return f"{100 * result[k]:6.2f}%"
        return f"{100 * result[k]:5.2f} ± {100 * result[k + '_std']:4.2f} ({100 * result[k + '_min']:5.2f})"

    lines.append(f"{'protocol':<16} {'top-1':>{width}} {'top-5':>{width}}  settings")
    for name, result, how in rows:
        lines.append(f"{name:<16} {cell(result, 'top1'):>{width}} {cell(result, 'top5'):>{width}}  {how}")
    return "\n".join(lines)

