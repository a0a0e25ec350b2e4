"""What barlow-eval and barlow-finetune share: the model to evaluate, the labelled data, the
feature cache, class-balanced label subsets, the linear heads and the classifier training loop.

* :func:`load_pretrained` reads ``--model_name_or_path`` (a pretraining, encoder or classifier
  folder, or a hub id) into a :class:`PretrainedModel`, which builds the frozen encoder or a
  classifier and knows the model's preprocessing.
* :func:`load_labelled_data` loads the training and held-out splits and their label names.
* :func:`cached_features` extracts features once per (model, data, preprocessing) and keeps them
  on disk.
* :func:`sgd_linear_probe` (the paper's protocol) and :func:`exact_linear_probe` (logistic
  regression) train linear classifiers on features; :func:`fit_classifier` trains a whole network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from modeling_barlow import BarlowTwinsConfig, create_image_processor

from .augment import supervised_train_transform
from .data import (
    DEFAULT_DATASET_NAME,
    LabelledCollator,
    count_examples,
    load_image_dataset,
    prepare_stream,
    resolve_image_column,
    resolve_label_column,
)
from .features import extract_features
from .monitor import eval_transform as barlow_eval_transform
from .optim import create_scheduler

__all__ = [
    "LabelledData",
    "PretrainedModel",
    "cached_features",
    "class_balanced_subset",
    "classification_head",
    "classifier_optimizer",
    "evaluate_classifier",
    "exact_linear_probe",
    "fit_classifier",
    "fraction_name",
    "linear_head",
    "load_labelled_data",
    "load_pretrained",
    "sgd_linear_probe",
    "topk_accuracy",
]

logger = logging.getLogger(__name__)

HELD_OUT_SPLITS = ("validation", "test")
CACHE_VERSION = 1
_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resampling ids


# ------------------------------------------------------------------------------------------ model
@dataclass
class PretrainedModel:
    """A model given by ``--model_name_or_path``, and everything about it the protocols need.

    ``random_init`` builds the same architecture with fresh weights (seeded), for baselines.
    """

    name: str
    config: Any
    processor: Any
    fingerprint: dict
    random_init: bool = False
    seed: int = 42

    @property
    def is_barlow_twins(self) -> bool:
        return isinstance(self.config, BarlowTwinsConfig)

    def _preprocessing(self) -> tuple[int, list[float], list[float], str, int]:
        """(image size, mean, std, interpolation name, channels) of the model's inputs."""
        if self.is_barlow_twins:
            c = self.config
            return c.image_size, list(c.image_mean), list(c.image_std), c.interpolation, c.num_channels
        p = self.processor
        data_config = getattr(p, "data_config", None)  # TimmWrapperImageProcessor: timm's own data config
        if isinstance(data_config, dict):
            channels, _, size = data_config["input_size"]
            return size, list(data_config["mean"]), list(data_config["std"]), data_config["interpolation"], channels
        crop = getattr(p, "crop_size", None) if getattr(p, "do_center_crop", False) else None
        sizes = crop or getattr(p, "size", None) or {}
        size = sizes.get("height") or sizes.get("shortest_edge")
        mean, std = getattr(p, "image_mean", None), getattr(p, "image_std", None)
        if not size or mean is None or std is None:
            raise ValueError(f"Cannot tell the input size and normalisation of {self.name} from its image processor.")
        resample = getattr(p, "resample", None)
        interpolation = _RESAMPLE_NAMES.get(int(resample), "bicubic") if resample is not None else "bicubic"
        return int(size), list(mean), list(std), interpolation, len(mean)

    @property
    def num_channels(self) -> int:
        return self._preprocessing()[4]

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> (C, S, S), as the model's image processor (and so its pipelines) does."""
        if self.is_barlow_twins:
            return barlow_eval_transform(self.config)
        processor = self.processor
        return lambda image: processor(image, return_tensors="pt")["pixel_values"][0]

    def train_transform(self, min_crop_scale: float = 0.08):
        """Random resized crop and flip at the model's resolution, normalised as it expects."""
        size, mean, std, interpolation, channels = self._preprocessing()
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            interpolation = "bicubic"
        return supervised_train_transform(size, mean, std, channels, interpolation, crop_scale=(min_crop_scale, 1.0))

    def preprocessing_key(self) -> dict:
        """What determines the evaluation inputs, for cache keys."""
        return {"processor": self.processor.to_dict(), "num_channels": self.num_channels}

    def _seeded(self) -> None:
        torch.manual_seed(self.seed)

    def encoder(self) -> nn.Module:
        """The encoder in eval mode; its output has ``pooler_output`` (B, F)."""
        if self.random_init:
            self._seeded()
            model = AutoModel.from_config(self.config)
        else:
            model, info = _load(AutoModel, self.name, output_loading_info=True)
            _check_no_missing(self.name, info, allowed=())
        _check_image_model(self.name, model)
        return model.eval()

    def classifier(self, label_names: Sequence[str]) -> tuple[nn.Module, nn.Module]:
        """(model, head): an image classifier for ``label_names`` on this encoder; ``id2label`` holds
        the names, and only the head is new (initialised N(0, 0.01) for Barlow Twins models)."""
        id2label = {i: str(name) for i, name in enumerate(label_names)}
        label2id = {name: i for i, name in id2label.items()}
        if self.random_init:
            config = AutoConfig.from_pretrained(self.name, num_labels=len(id2label), id2label=id2label, label2id=label2id)
            self._seeded()
            model = AutoModelForImageClassification.from_config(config)
            head = classification_head(model)
        else:
            model, info = _load(
                AutoModelForImageClassification, self.name, num_labels=len(id2label), id2label=id2label,
                label2id=label2id, ignore_mismatched_sizes=True, output_loading_info=True,
            )
            head = classification_head(model)
            head_ids = {id(p) for p in head.parameters()}
            _check_no_missing(self.name, info, allowed={n for n, p in model.named_parameters() if id(p) in head_ids})
        _check_image_model(self.name, model)
        return model, head


def _load(auto_class, name: str, **kwargs):
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"Cannot load {name} as {auto_class.__name__}: {error}") from error
    except RuntimeError as error:  # transformers refuses weights whose shapes differ from the config's
        raise ValueError(
            f"Cannot load {name}: its weights do not fit the architecture its config.json describes (shapes differ, "
            "see the load report above)."
        ) from error


def _check_no_missing(name: str, info: dict, allowed) -> None:
    missing = [key for key in info.get("missing_keys", []) if key not in allowed]
    missing += [key for key, *_ in info.get("mismatched_keys", []) if key not in allowed]
    if missing:
        raise ValueError(
            f"{name} lacks {len(missing)} encoder weight(s) (e.g. {missing[0]}): it is not a checkpoint of this "
            "architecture's encoder. Give a barlow-pretrain output folder or a saved encoder."
        )


def _check_image_model(name: str, model: nn.Module) -> None:
    if getattr(model, "main_input_name", None) != "pixel_values":
        raise ValueError(
            f"{name} is a {model.config.model_type} model that does not take images; give a barlow-pretrain output "
            "folder, a saved Barlow Twins encoder or another image model."
        )


def classification_head(model: nn.Module) -> nn.Module:
    """The layer that maps features to logits: ``classifier`` (Barlow Twins and most transformers
    image models) or the timm classifier of a TimmWrapper model."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Module):
        return head
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "get_classifier"):
        return timm_model.get_classifier()
    raise ValueError(f"Cannot find the classification head of {type(model).__name__}.")


def _model_directory(name: str) -> tuple[Path, bool]:
    """(folder holding config.json, whether it is a local folder rather than a hub snapshot)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{name} is not a model folder (no config.json): give a barlow-pretrain output folder, a saved "
                "encoder or classifier folder, or a hub id."
            )
        return path.resolve(), True
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"Model folder {name} does not exist.")
    from transformers.utils import cached_file

    try:
        return Path(cached_file(name, "config.json")).parent, False
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{name} is neither a local folder nor a model on the hub (offline, HF_HUB_OFFLINE=1: only models in the "
            f"local cache): {error}"
        ) from error


def _stat_files(paths: Iterable[Path], root: Path) -> list:
    """(path relative to ``root``, size, mtime_ns) of each file, sorted: changes when any of them
    is rewritten or replaced."""
    return sorted([str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.is_file())


def _model_files(folder: Path) -> list:
    """The files from_pretrained reads: config.json and the weights (not metrics or checkpoints)."""
    return _stat_files(
        (p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")
         or p.name.endswith(".safetensors.index.json")),
        folder,
    )


def load_pretrained(name: str, random_init: bool = False, seed: int = 42) -> PretrainedModel:
    """Resolve ``--model_name_or_path``: its config, image processor and a fingerprint of its
    weights (local folder: path, sizes and modification times; hub: the snapshot's commit).

    Raises FileNotFoundError for a missing folder or an unknown hub id, ValueError for a folder
    that is not an image model."""
    directory, local = _model_directory(name)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{name} is not a model transformers can read: {error}") from error
    if isinstance(config, BarlowTwinsConfig):
        processor = create_image_processor(config)
    else:
        try:
            processor = AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(
                f"{name} ({config.model_type}) has no image processor (preprocessor_config.json), so its preprocessing "
                f"is unknown: {error}"
            ) from error
    if local:
        fingerprint = {"path": str(directory), "files": _model_files(directory)}
    else:
        fingerprint = {"hub": name, "snapshot": directory.name}
    if random_init:
        fingerprint = {"random_init": True, "seed": seed, "config": config.to_dict()}
    return PretrainedModel(name, config, processor, fingerprint, random_init, seed)


# ------------------------------------------------------------------------------------------- data
@dataclass
class LabelledData:
    """A labelled training split and a held-out split, with their columns and class names."""

    train: Any
    eval: Any
    train_split: str
    eval_split: str
    image_column: str
    label_column: str
    label_names: list[str]
    label2id: dict | None  # for labels that are not class ids (e.g. strings)
    identity: dict  # what the data is, for cache keys
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    _labels: dict = field(default_factory=dict, repr=False)
    _subsets: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def split(self, name: str):
        return self.train if name == "train" else self.eval

    def max_samples(self, name: str) -> int | None:
        return self.max_train_samples if name == "train" else self.max_eval_samples

    def labels(self, name: str) -> list[int]:
        """The class ids of a split ("train" or "eval") in stream order, read once (no images decoded)."""
        if name not in self._labels:
            values = _read_labels(self.split(name), self.label_column, self.max_samples(name))
            self._labels[name] = self._encode(values, name)
        return self._labels[name]

    def num_examples(self, name: str) -> int:
        count = count_examples(self.split(name))
        if count is None:
            return len(self.labels(name))
        cap = self.max_samples(name)
        return min(count, cap) if cap else count

    def _encode(self, values: list, split: str) -> list[int]:
        try:
            ids = [self.label2id[v] for v in values] if self.label2id is not None else [int(v) for v in values]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"The {split} split has a label {error} outside the training labels.") from None
        if ids and (min(ids) < 0 or max(ids) >= self.num_classes):
            raise ValueError(
                f"The {split} split has labels outside [0, {self.num_classes}) (e.g. -1 marks unlabelled examples); "
                "evaluate on a labelled split."
            )
        return ids

    def collator(self, transform: Callable, num_channels: int) -> Callable:
        """Undecoded examples -> {"pixel_values", "labels", "num_skipped"} (:class:`LabelledCollator`)."""
        collate = LabelledCollator(transform, self.image_column, self.label_column, num_channels)
        return collate if self.label2id is None else _EncodedLabels(collate, self.label_column, self.label2id)

    def loader(
        self,
        name: str,
        transform: Callable,
        num_channels: int,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 42,
        epoch: int = 0,
        shuffle_buffer_size: int = 10_000,
        num_workers: int = 0,
        indices: Sequence[int] | None = None,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> DataLoader:
        """A loader of one split ("train" or "eval"), optionally only its examples at ``indices``
        (positions in stream order, as in :meth:`labels`), shuffled per ``epoch``, and this
        process's share of it."""
        dataset, max_samples = self.split(name), self.max_samples(name)
        if indices is not None:
            dataset, max_samples = self._subset(name, indices), None
        stream = prepare_stream(
            dataset, self.image_column, label_column=self.label_column, seed=seed, shuffle=shuffle,
            shuffle_buffer_size=shuffle_buffer_size, max_samples=max_samples,
            process_index=process_index, num_processes=num_processes,
        )
        stream.set_epoch(epoch)
        return DataLoader(
            stream, batch_size=batch_size, collate_fn=self.collator(transform, num_channels), num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed + epoch),
        )


    def _subset(self, name: str, indices: Sequence[int]) -> datasets.Dataset:
        """The examples at ``indices`` (stream positions) as a map-style set. A stream's subset is
        read once, in order, and kept in memory undecoded: positions counted inside a shuffled
        stream would follow the shuffled shard order, not the order the labels were read in."""
        dataset, keep = self.split(name), sorted(set(int(i) for i in indices))
        if isinstance(dataset, datasets.Dataset):
            return dataset.select(keep)
        key = (name, tuple(keep))
        if key not in self._subsets:
            wanted = set(keep)
            stream = prepare_stream(dataset, self.image_column, label_column=self.label_column, shuffle=False,
                                    max_samples=self.max_samples(name))
            rows = [example for i, example in enumerate(stream) if i in wanted]
            features = datasets.Features({
                self.image_column: datasets.Image(decode=False),
                self.label_column: (stream.features or {}).get(self.label_column) or datasets.Value("string"),
            })
            if not isinstance(features[self.label_column], datasets.ClassLabel) and self.label2id is None:
                features[self.label_column] = datasets.Value("int64")
            self._subsets[key] = datasets.Dataset.from_list(rows, features=features)
        return self._subsets[key]


class _EncodedLabels:
    """Maps label values to class ids before the collator."""

    def __init__(self, collate: Callable, label_column: str, label2id: dict) -> None:
        self.collate, self.label_column, self.label2id = collate, label_column, label2id

    def __call__(self, examples: list[dict]) -> dict:
        return self.collate([{**ex, self.label_column: self.label2id[ex[self.label_column]]} for ex in examples])


def _read_labels(dataset, label_column: str, max_samples: int | None) -> list:
    if isinstance(dataset, datasets.Dataset):
        rows = dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))
        return list(rows[label_column])
    stream = dataset.select_columns([label_column])
    if max_samples is not None:
        stream = stream.take(max_samples)
    return [example[label_column] for example in stream]


def _load_eval_split(data_args, eval_split: str | None):
    names = [eval_split] if eval_split else list(HELD_OUT_SPLITS)
    error = None
    for split in names:
        try:
            return load_image_dataset(
                data_args.dataset_name, data_args.dataset_config_name, split, data_args.train_dir,
                data_args.streaming, data_args.cache_dir,
            ), split
        except (ValueError, KeyError) as err:
            error = err
    if eval_split:
        raise ValueError(f"Cannot load the evaluation split {eval_split!r}: {error}")
    raise ValueError(f"The dataset has no 'validation' or 'test' split ({error}); pass --eval_split.")


def _data_identity(data_args) -> dict:
    source = data_args.train_dir or data_args.dataset_name
    identity: dict[str, Any] = {"config": data_args.dataset_config_name}
    if source is None:
        import sklearn

        identity["source"] = f"{DEFAULT_DATASET_NAME} (scikit-learn {sklearn.__version__})"
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser().resolve()
        files = (Path(root, f) for root, _, names in os.walk(path) for f in names) if path.is_dir() else [path]
        identity.update(source=str(path), files=_stat_files(files, path.parent if path.is_file() else path))
    else:
        identity["source"] = source
    return identity


def load_labelled_data(data_args, supervised_args) -> LabelledData:
    """The training split (``--train_split``) and the held-out one (``--eval_split``, else
    'validation', else 'test'), with the image and label columns and the class names (from a
    ``ClassLabel`` feature; else the sorted distinct labels, read from the training split)."""
    train = load_image_dataset(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_split, data_args.train_dir,
        data_args.streaming, data_args.cache_dir,
    )
    held_out, eval_split = _load_eval_split(data_args, supervised_args.eval_split)
    image_column = resolve_image_column(train, data_args.image_column)
    label_column = resolve_label_column(train, supervised_args.label_column)
    if label_column is None:
        columns = list(train.features) if train.features is not None else train.column_names
        raise ValueError(f"No label column (no ClassLabel feature, none of label/labels/cls); the dataset has columns "
                         f"{columns}. Pass --label_column.")
    resolve_label_column(held_out, label_column)  # the held-out split must have it too
    data = LabelledData(
        train, held_out, data_args.train_split, eval_split, image_column, label_column, [], None,
        identity={**_data_identity(data_args), "image_column": image_column, "label_column": label_column},
        max_train_samples=data_args.max_train_samples, max_eval_samples=supervised_args.max_eval_samples,
    )
    feature = (train.features or {}).get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        data.label_names = list(feature.names)
        return data
    values = _read_labels(train, label_column, data_args.max_train_samples)
    if not values:
        raise ValueError("The training split is empty.")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        data.label_names = [str(i) for i in range(int(max(values)) + 1)]
    else:
        distinct = sorted(set(values), key=str)
        data.label_names = [str(v) for v in distinct]
        data.label2id = {v: i for i, v in enumerate(distinct)}
    data._labels["train"] = data._encode(values, "train")
    return data


# ----------------------------------------------------------------------------------- feature cache
def _cache_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"{digest}.pt"


def cached_features(
    encoder_fn: Callable[[], nn.Module],
    model: PretrainedModel,
    data: LabelledData,
    split: str,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    autocast: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features (N, F) float32, labels (N,), whether they came from the cache) of one split
    ("train" or "eval"), preprocessed by the model's image processor, in stream order.

    The cache file is named by a hash of the model (its folder, file sizes and modification times,
    or hub commit), the data (source, split, columns, sample cap, local file stamps) and the
    preprocessing; ``cache_dir=None`` neither reads nor writes. ``encoder_fn`` is only called on
    a cache miss.
    """
    key = _cache_key(model, data, split)
    path = _cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("key") == json.dumps(key, sort_keys=True, default=str):
                logger.info(f"Features of the {split} split loaded from the cache ({path}).")
                return saved["features"], saved["labels"], True
        except (OSError, RuntimeError, EOFError, KeyError, AttributeError):
            logger.warning(f"Ignoring an unreadable feature cache file {path}.")
    encoder = encoder_fn().to(device)
    loader = data.loader(split, model.eval_transform(), model.num_channels, batch_size, num_workers=num_workers)
    # Our own bar: extract_features(progress=True) asks len() of the loader, which a stream lacks.
    from tqdm.auto import tqdm

    batches = tqdm(loader, total=math.ceil(data.num_examples(split) / batch_size), desc=f"{split} features", leave=False)
    with autocast() if autocast is not None else nullcontext():
        features, labels = extract_features(encoder, batches, device)
    if features.shape[0] == 0:
        raise ValueError(f"The {split} split has no readable images.")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        torch.save({"key": json.dumps(key, sort_keys=True, default=str), "features": features, "labels": labels}, partial)
        os.replace(partial, path)  # readers never see half a file
        path.with_suffix(".json").write_text(json.dumps(key, indent=2, default=str))
    return features, labels, False


def _cache_key(model: PretrainedModel, data: LabelledData, split: str) -> dict:
    return {
        "version": CACHE_VERSION,
        "model": model.fingerprint,
        "preprocessing": model.preprocessing_key(),
        "data": data.identity,
        "split": data.eval_split if split == "eval" else data.train_split,
        "max_samples": data.max_samples(split),
        "label2id": sorted(map(str, data.label2id)) if data.label2id else None,
    }


# ---------------------------------------------------------------------------------------- subsets
def class_balanced_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """Positions of a class-balanced ``fraction`` of ``labels``: the same number of examples of
    every class, ``max(1, round(fraction * N / C))`` (C = classes present; all of a class that has
    fewer), drawn without replacement with ``seed``. Each class is shuffled once by ``seed``, and
    the subset takes the first examples of that order, so a larger fraction contains a smaller
    one. Returns sorted positions."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("no labels to draw a subset from")
    classes = np.unique(labels)
    per_class = max(1, round(fraction * labels.size / classes.size))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        positions = np.flatnonzero(labels == c)
        chosen.extend(positions[rng.permutation(positions.size)[:per_class]].tolist())
    return sorted(chosen)


def fraction_name(fraction: float) -> str:
    """0.01 -> '1pct', 0.1 -> '10pct', 0.005 -> '0.5pct' (metric names)."""
    return f"{round(fraction * 100, 6):g}pct"


# ------------------------------------------------------------------------------------ linear heads
def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{"top1"} and, with at least 5 classes, {"top5"}: fractions in [0, 1]."""
    labels = labels.to(scores.device).long()
    result = {"top1": (scores.argmax(1) == labels).double().mean().item()}
    if scores.shape[1] >= 5:
        result["top5"] = (scores.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean().item()
    return result


def _topk_correct(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 correct, top-5 correct, count] as float64 sums."""
    labels = labels.to(scores.device).long()
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return torch.tensor(
        [(top5[:, 0] == labels).sum().item(), (top5 == labels[:, None]).any(1).sum().item(), labels.numel()],
        dtype=torch.float64,
    )


def linear_head(num_features: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """The linear-evaluation head: weights N(0, 0.01), zero bias."""
    head = nn.Linear(num_features, num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    return head


def fit_linear_head(
    head: nn.Linear,
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int,
    steps_per_epoch: int,
    learning_rate: float = 0.3,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
) -> nn.Linear:
    """The paper's linear protocol for the head: SGD with momentum and weight decay, the learning
    rate following a per-step cosine to 0.001 of its peak. ``epoch_batches(epoch)`` yields
    (features (B, F), labels (B,)) on the head's device."""
    optimizer = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    total = max(1, epochs * steps_per_epoch)
    scheduler = create_scheduler(optimizer, total, 0)
    head.train()
    step = 0
    for epoch in range(epochs):
        for features, labels in epoch_batches(epoch):
            if step >= total:
                break
            loss = F.cross_entropy(head(features.float()), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
    return head.eval()


def sgd_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 0.3,
    weight_decay: float = 1e-6,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Class scores (Q, C) on ``test_features`` of a linear head trained with the paper's
    protocol on fixed features (batches reshuffled every epoch with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    head = linear_head(train_features.shape[1], num_classes, generator).to(device)
    x, y = train_features.to(device), train_labels.to(device)
    steps_per_epoch = math.ceil(len(x) / batch_size)

    def batches(epoch: int):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            yield x[index], y[index]

    fit_linear_head(head, batches, epochs, steps_per_epoch, learning_rate, weight_decay)
    with torch.no_grad():
        return head(test_features.to(device).float()).cpu()


def exact_linear_probe(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Class probabilities (Q, C) of multinomial logistic regression (scikit-learn, L-BFGS, C=1)
    on standardised features: the same fit as :func:`training.features.linear_probe_top1`.
    Classes absent from the training labels get probability 0."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features.numpy())
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train_features.numpy()), train_labels.numpy())
    probabilities = probe.predict_proba(scaler.transform(test_features.numpy()))
    scores = torch.zeros(test_features.shape[0], num_classes, dtype=torch.float64)
    scores[:, torch.as_tensor(probe.classes_, dtype=torch.long)] = torch.as_tensor(probabilities, dtype=torch.float64)
    return scores


# ------------------------------------------------------------------------------ fine-tuning a model
def classifier_optimizer(
    model: nn.Module,
    head: nn.Module,
    name: str = "sgd",
    backbone_learning_rate: float = 0.005,
    head_learning_rate: float = 0.5,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW with one learning rate for the head and another for everything
    else; weight decay only on weights with more than one dimension (not biases or norms). Each
    group records ``peak_lr`` for :func:`training.optim.create_scheduler`; frozen parameters are
    left out."""
    head_ids = {id(p) for p in head.parameters()}
    groups = []
    for part, lr in (("backbone", backbone_learning_rate), ("head", head_learning_rate)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head_ids) == (part == "head")]
        for kind, decay in (("weights", weight_decay), ("biases", 0.0)):
            chosen = [p for p in params if (p.ndim > 1) == (kind == "weights")]
            if chosen:
                groups.append({"name": f"{part}_{kind}", "params": chosen, "lr": lr, "peak_lr": lr, "weight_decay": decay})
    if not groups:
        raise ValueError("The model has no trainable parameters.")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"])
    raise ValueError(f"Unknown optimizer {name!r}; choose sgd or adamw.")


def _all_processes(accelerator, flag: bool) -> bool:
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    value = torch.tensor([int(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() == accelerator.num_processes)


def fit_classifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    make_loader: Callable[[int], Iterable[dict]],
    total_steps: int,
    *,
    accelerator=None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> int:
    """Train ``model`` (cross-entropy on its ``logits``) for ``total_steps`` optimizer steps over
    epochs of ``make_loader(epoch)``. Batches with fewer than 2 images are skipped (BatchNorm).
    With an ``accelerator`` (model and optimizer prepared), every process stops at the end of the
    shortest share. ``on_step(step, loss)`` and ``on_epoch_end(epoch, step)`` are called back.
    Returns the number of steps done."""
    device = accelerator.device if accelerator is not None else torch.device(device)
    step, epoch = 0, 0
    while step < total_steps:
        model.train()
        batches = iter(make_loader(epoch))
        stepped = False
        while step < total_steps:
            batch = next(batches, None)
            if not _all_processes(accelerator, batch is not None):
                break
            if not _all_processes(accelerator, batch["pixel_values"].shape[0] >= 2):
                continue
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            logits = model(pixel_values=pixel_values).logits
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            stepped = True
            if on_step is not None:
                on_step(step, loss.item())
        if on_epoch_end is not None:
            on_epoch_end(epoch, step)
        if not stepped:
            raise ValueError("An epoch produced no training batch of 2 or more readable images.")
        epoch += 1
    return step


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, loader: Iterable[dict], num_classes: int, *, accelerator=None, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes) of ``model`` in eval mode over ``loader``; with an
    ``accelerator``, over every process's share."""
    device = accelerator.device if accelerator is not None else torch.device(device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    try:
        for batch in loader:
            if batch["pixel_values"].shape[0] == 0:
                continue
            labels = batch["labels"]
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"Evaluation labels must lie in [0, {num_classes}).")
            context = accelerator.autocast() if accelerator is not None else nullcontext()
            with context:
                logits = model(pixel_values=batch["pixel_values"].to(device)).logits
            totals += _topk_correct(logits.float(), labels)
    finally:
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
    if totals[2] == 0:
        raise ValueError("The evaluation split has no readable images.")
    result = {"top1": (totals[0] / totals[2]).item()}
    if num_classes >= 5:
        result["top5"] = (totals[1] / totals[2]).item()
    return result
