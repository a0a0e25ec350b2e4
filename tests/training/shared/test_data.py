"""Tests for training/shared/data.py and training/shared/collate.py on small real images written to disk (no downloads)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from itertools import islice
from pathlib import Path

import datasets
import datasets.distributed
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from training.shared import data
from training.shared.collate import LabelledCollator, TwoViewCollator, decode_image
from training.shared.data import (
    DEFAULT_DATASET_NAME,
    count_examples,
    load_image_dataset,
    prepare_stream,
    resolve_image_column,
    resolve_label_column,
)

SIZE = 16


class OneView:
    """PIL -> (C, SIZE, SIZE) float tensor."""

    def __init__(self) -> None:
        self.t = v2.Compose([v2.ToImage(), v2.Resize((SIZE, SIZE), antialias=True), v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.t(image)


class TwoViews(OneView):
    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.t(image)
        return x, x.flip(-1)


@pytest.fixture(autouse=True)
def _isolated_datasets(monkeypatch, tmp_path_factory):
    """Keep datasets' cache (and its lock files, written even when streaming) out of ~/.cache, and
    skip the 5 s sleep datasets adds after a shuffled multi-file parquet stream ends (an Arrow
    thread-shutdown workaround, config.SLEEP_TIME_ON_THREADS_SHUTDOWN) - irrelevant to these checks."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def china() -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg")


def crops(china: np.ndarray, n: int, size: int = 24) -> list[Image.Image]:
    """n distinct real photo crops."""
    return [Image.fromarray(china[20 * i : 20 * i + size, 15 * i : 15 * i + size].copy()) for i in range(n)]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def ident(example: dict) -> str:
    """Identity of a streamed (undecoded) example: its path, else a hash of its bytes."""
    value = example["image"] if "image" in example else example["jpg"]
    if isinstance(value, dict) and value.get("path"):
        return value["path"]
    return hashlib.sha1(value["bytes"]).hexdigest()


def pixel_hash(image: Image.Image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory, china) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir()
        for i, img in enumerate(crops(china, 4)):
            (img if c == 0 else img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).save(root / cls / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory, china) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i, img in enumerate(crops(china, 3)):
        img.save(root / "a" / f"{i}.png")
    (root / "a" / "notes.png").write_text("this is not a png")
    whole = encode(Image.fromarray(china[100:292, 100:292].copy()), "JPEG")
    (root / "b" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # valid header, data cut
    crops(china, 4)[3].save(root / "b" / "ok.jpg")
    return root


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory, china) -> Path:
    root = tmp_path_factory.mktemp("parquet")
    images = crops(china, 20, size=20)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"]), "id": datasets.Value("int64")}
    )
    for shard in range(4):
        ids = list(range(5 * shard, 5 * shard + 5))
        ds = datasets.Dataset.from_dict(
            {"image": [images[i] for i in ids], "label": [i % 2 for i in ids], "id": ids}, features=features
        )
        ds.to_parquet(str(root / f"train-{shard:05d}.parquet"))
    return root


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory, china) -> Path:
    root = tmp_path_factory.mktemp("wds")
    images = crops(china, 6)
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:04d}.tar", "w") as tar:
            for i in range(3):
                n = 3 * shard + i
                for name, payload in ((f"{n:04d}.jpg", encode(images[n], "JPEG")), (f"{n:04d}.cls", str(n % 3).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


# ------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("streaming", [True, False])
def test_imagefolder_loads(imagefolder, tmp_path, streaming):
    ds = load_image_dataset(train_dir=str(imagefolder), streaming=streaming, cache_dir=str(tmp_path))
    assert isinstance(ds, datasets.IterableDataset if streaming else datasets.Dataset)
    assert resolve_image_column(ds) == "image"
    assert resolve_label_column(ds) == "label"
    assert ds.features["label"].names == ["cat", "dog"]
    assert sum(1 for _ in ds) == 8
    assert count_examples(ds) == (None if streaming else 8)
    by_path = load_image_dataset(str(imagefolder), streaming=streaming, cache_dir=str(tmp_path))
    assert resolve_image_column(by_path) == "image" and resolve_label_column(by_path) == "label"


def test_imagefolder_stream_through_dataloader(imagefolder):
    ds = load_image_dataset(train_dir=str(imagefolder))
    stream = prepare_stream(ds, "image", label_column="label", shuffle_buffer_size=16)
    assert set(stream.features) == {"image", "label"} and stream.features["image"].decode is False
    batches = list(DataLoader(stream, batch_size=3, collate_fn=TwoViewCollator(TwoViews(), "image")))
    assert [b["pixel_values"].shape for b in batches] == [(3, 3, SIZE, SIZE)] * 2 + [(2, 3, SIZE, SIZE)]
    assert all(b["pixel_values_2"].shape == b["pixel_values"].shape for b in batches)
    assert all(b["num_skipped"] == 0 for b in batches)
    assert torch.equal(batches[0]["pixel_values_2"], batches[0]["pixel_values"].flip(-1))

    labelled = DataLoader(prepare_stream(ds, "image", label_column="label", shuffle=False), batch_size=8,
                          collate_fn=LabelledCollator(OneView(), "image", "label"))
    (batch,) = list(labelled)
    assert batch["pixel_values"].shape == (8, 3, SIZE, SIZE)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0] * 4 + [1] * 4


def test_parquet_streams_one_shard_per_file(parquet_dir):
    ds = load_image_dataset(str(parquet_dir))
    assert isinstance(ds, datasets.IterableDataset) and ds.n_shards == 4
    assert resolve_image_column(ds) == "image" and resolve_label_column(ds) == "label"
    assert sorted(ex["id"] for ex in ds) == list(range(20))


def test_webdataset_streams(wds_dir):
    ds = load_image_dataset(str(wds_dir))
    assert ds.n_shards == 2
    assert resolve_image_column(ds) == "jpg" and resolve_label_column(ds) == "cls"
    stream = prepare_stream(ds, "jpg", label_column="cls", shuffle=False)
    (batch,) = list(DataLoader(stream, batch_size=6, collate_fn=LabelledCollator(OneView(), "jpg", "cls")))
    assert batch["pixel_values"].shape == (6, 3, SIZE, SIZE)
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1, 2]


def test_columns_found_by_peeking_when_features_unknown(china):
    payloads = [encode(img, "JPEG") for img in crops(china, 3)]

    def gen():
        for i, p in enumerate(payloads):
            yield {"key": str(i), "payload": p, "target": i}

    ds = datasets.IterableDataset.from_generator(gen)
    assert ds.features is None
    assert resolve_image_column(ds) == "payload"
    assert resolve_label_column(ds) is None
    with pytest.raises(ValueError, match="payload"):
        resolve_image_column(ds, "image")
    stream = prepare_stream(ds, "payload", label_column="target", shuffle=False)
    (batch,) = list(DataLoader(stream, batch_size=3, collate_fn=LabelledCollator(OneView(), "payload", "target")))
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE) and batch["labels"].tolist() == [0, 1, 2]


def test_save_to_disk_folders(tmp_path, china):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": crops(china, 6), "label": [0, 1] * 3}, features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))

    loaded = load_image_dataset(str(tmp_path / "single"), streaming=False)
    assert isinstance(loaded, datasets.Dataset) and len(loaded) == 6
    streamed = load_image_dataset(str(tmp_path / "single"))
    assert isinstance(streamed, datasets.IterableDataset) and streamed.n_shards > 1
    assert count_examples(streamed) == 6 and sum(1 for _ in streamed) == 6
    test = load_image_dataset(str(tmp_path / "dict"), split="test", streaming=False)
    assert len(test) == 2 and resolve_image_column(test) == "image"
    with pytest.raises(ValueError, match=r"available splits.*'test'.*'train'"):
        load_image_dataset(str(tmp_path / "dict"), split="validation")


def test_default_digits():
    data._digits_splits.cache_clear()
    train = load_image_dataset(split="train", streaming=False)
    test = load_image_dataset(split="test", streaming=False)
    assert (len(train), len(test)) == (1438, 359)  # round(0.8 * 1797)
    assert len(load_image_dataset(split="validation", streaming=False)) == 359
    assert train.features["label"].names == [str(i) for i in range(10)]
    assert set(train["label"]) == set(test["label"]) == set(range(10))
    assert train[0]["image"].mode == "L" and train[0]["image"].size == (32, 32)
    train_h = [pixel_hash(img) for img in train["image"]]
    test_h = [pixel_hash(img) for img in test["image"]]
    assert len(set(train_h) | set(test_h)) == 1797  # the 1797 digits are all distinct
    assert not set(train_h) & set(test_h)

    data._digits_splits.cache_clear()  # rebuilt from scratch: same split, same order
    again = load_image_dataset(split="train", streaming=False)
    assert [pixel_hash(img) for img in again["image"][:50]] == train_h[:50] and again["label"] == train["label"]

    streamed = load_image_dataset()
    assert isinstance(streamed, datasets.IterableDataset) and streamed.n_shards == 8
    assert count_examples(streamed) == 1438 and streamed.info.dataset_name == DEFAULT_DATASET_NAME
    assert count_examples(load_image_dataset(split="validation"), "validation") == 359


# ------------------------------------------------------------------------------------- decoding
def _mode_images(china) -> dict[str, Image.Image]:
    rgb = crops(china, 1)[0]
    rgba = rgb.convert("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent -> white
    deep = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    return {"L": rgb.convert("L"), "RGBA": rgba, "P": rgb.convert("P"), "LA": rgb.convert("LA"), "I;16": deep, "RGB": rgb}


@pytest.mark.parametrize("num_channels", [1, 3])
def test_image_modes_become_requested_channels(china, num_channels):
    examples = [{"image": {"bytes": encode(img), "path": None}} for img in _mode_images(china).values()]
    batch = TwoViewCollator(TwoViews(), "image", num_channels=num_channels)(examples)
    assert batch["pixel_values"].shape == (len(examples), num_channels, SIZE, SIZE)
    assert batch["num_skipped"] == 0


def test_decode_image_inputs(china, tmp_path):
    images = _mode_images(china)
    assert decode_image({"bytes": encode(images["RGBA"]), "path": None}).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(images["I;16"], "L").getpixel((3, 3)) == images["L"].getpixel((3, 3))
    path = tmp_path / "x.png"
    images["P"].save(path)
    for value in (str(path), path, {"bytes": None, "path": str(path)}, path.read_bytes(), images["P"]):
        out = decode_image(value)
        assert out.mode == "RGB" and out.size == (24, 24)
    assert decode_image(np.zeros((5, 6), np.uint8), "RGB").size == (6, 5)
    assert decode_image(np.ones((5, 6, 3), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(np.zeros((3, 5, 6), np.uint8)).size == (6, 5)  # CHW
    assert decode_image(None) is None and decode_image(b"definitely not an image") is None
    with pytest.raises(TypeError):
        decode_image(7)  # a wrong column is an error, not an unreadable image
    assert decode_image(encode(images["RGB"], "JPEG")[:200]) is None  # truncated inside the header
    half = encode(Image.fromarray(china[100:292, 100:292].copy()), "JPEG")
    half = half[: len(half) // 2]
    assert Image.open(io.BytesIO(half)).size == (192, 192)  # opens lazily; fails only when decoded
    assert decode_image(half, "RGB") is None and decode_image({"bytes": half, "path": None}, "RGB") is None
    assert decode_image(str(tmp_path / "missing.png")) is None
    with pytest.raises(ValueError):
        TwoViewCollator(TwoViews(), "image", num_channels=2)


def test_corrupt_images_in_imagefolder_are_skipped(corrupt_folder):
    ds = load_image_dataset(train_dir=str(corrupt_folder))
    stream = prepare_stream(ds, "image", label_column="label", shuffle=False)
    batches = list(DataLoader(stream, batch_size=3, collate_fn=TwoViewCollator(TwoViews(), "image")))
    assert sum(b["num_skipped"] for b in batches) == 2
    assert sum(len(b["pixel_values"]) for b in batches) == 4
    labelled = list(DataLoader(stream, batch_size=6, collate_fn=LabelledCollator(OneView(), "image", "label")))
    assert labelled[0]["num_skipped"] == 2 and labelled[0]["labels"].tolist() == [0, 0, 0, 1]


def test_corrupt_bytes_in_parquet_are_skipped(tmp_path, china):
    good = [{"bytes": encode(img), "path": None} for img in crops(china, 3)]
    bad = [{"bytes": b"garbage", "path": None}, {"bytes": encode(crops(china, 1)[0], "JPEG")[:150], "path": None}]
    ds = datasets.Dataset.from_dict({"image": good + bad}, features=datasets.Features({"image": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "p" / "data.parquet"))
    stream = prepare_stream(load_image_dataset(str(tmp_path / "p")), "image", shuffle=False)
    collator = TwoViewCollator(TwoViews(), "image")
    assert collator([{"image": bad[0]}])["pixel_values"].shape == (0,)  # nothing seen yet: shape unknown
    batches = list(DataLoader(stream, batch_size=3, collate_fn=collator))
    assert [len(b["pixel_values"]) for b in batches] == [3, 0] and batches[1]["num_skipped"] == 2
    assert batches[1]["pixel_values"].shape == (0, 3, SIZE, SIZE)  # shape known from the first batch


# --------------------------------------------------------------------------------------- errors
def test_column_errors_name_present_columns(imagefolder):
    ds = load_image_dataset(train_dir=str(imagefolder))
    with pytest.raises(ValueError, match=r"'nope'.*\['image', 'label'\]"):
        resolve_image_column(ds, "nope")
    with pytest.raises(ValueError, match=r"\['image', 'label'\]"):
        resolve_label_column(ds, "class")
    plain = datasets.Dataset.from_dict({"text": ["a"], "value": [1]})
    with pytest.raises(ValueError, match=r"\['text', 'value'\]"):
        resolve_image_column(plain)
    assert resolve_label_column(plain) is None
    with pytest.raises(ValueError, match=r"\['image', 'label'\]"):
        prepare_stream(ds, "photo")


def test_unknown_split_and_missing_paths(imagefolder, tmp_path):
    with pytest.raises(ValueError, match=r"'train', 'test', 'validation'"):
        load_image_dataset(split="holdout")
    with pytest.raises(ValueError, match=r"train"):
        load_image_dataset(train_dir=str(imagefolder), split="holdout")
    with pytest.raises(FileNotFoundError):
        load_image_dataset(train_dir=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError):
        load_image_dataset(str(tmp_path / "absent" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        load_image_dataset(str(tmp_path / "empty"))


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (no network)")
def test_uncached_hub_id_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="cache"):
        load_image_dataset("no-such-user/no-such-dataset-xyz")


# ------------------------------------------------------------------------------------- sharding
def _ranks(ds, num_processes: int, key=ident, **kwargs) -> list[list]:
    return [
        [key(ex) for ex in prepare_stream(ds, "image", process_index=r, num_processes=num_processes, **kwargs)]
        for r in range(num_processes)
    ]


@pytest.mark.parametrize("num_processes", [2, 3])
def test_sharding_parquet_disjoint_and_complete(parquet_dir, caplog, num_processes):
    ds = load_image_dataset(str(parquet_dir))
    with caplog.at_level(logging.WARNING, logger="training.shared.data"):
        parts = _ranks(ds, num_processes, key=lambda ex: ex["id"], label_column="id")
    assert sorted(sum(parts, [])) == list(range(20))
    assert all(parts)
    assert ("split by example" in caplog.text) == (num_processes == 3)  # 4 shards: 2 ranks split by file


def test_sharding_digits_disjoint_and_complete(caplog):
    with caplog.at_level(logging.WARNING, logger="training.shared.data"):
        parts = _ranks(load_image_dataset(), 2)
        map_parts = _ranks(load_image_dataset(streaming=False), 2)
    assert "split by example" not in caplog.text
    for a, b in (parts, map_parts):
        assert not set(a) & set(b) and len(set(a) | set(b)) == len(a) + len(b) == 1438


def test_shards_only_once(parquet_dir):
    ds = load_image_dataset(str(parquet_dir))
    already = datasets.distributed.split_dataset_by_node(ds, rank=0, world_size=2)
    with pytest.raises(ValueError, match="already split"):
        prepare_stream(already, "image", process_index=0, num_processes=2)


def test_sharding_single_shard_imagefolder_splits_by_example(imagefolder, caplog):
    ds = load_image_dataset(train_dir=str(imagefolder))
    assert ds.n_shards == 1
    with caplog.at_level(logging.WARNING, logger="training.shared.data"):
        a, b = _ranks(ds, 2, label_column="label")
    assert "split by example" in caplog.text
    assert not set(a) & set(b) and len(a) == len(b) == 4 and len(set(a) | set(b)) == 8


def test_dataloader_workers_read_each_example_once(parquet_dir):
    stream = prepare_stream(load_image_dataset(str(parquet_dir)), "image", label_column="id")
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=LabelledCollator(OneView(), "image", "id"))
    assert sorted(torch.cat([b["labels"] for b in loader]).tolist()) == list(range(20))


def test_shuffle_epochs_and_reproducibility():
    ds = load_image_dataset()
    first = prepare_stream(ds, "image", seed=3, shuffle_buffer_size=200)
    order0 = [ident(ex) for ex in islice(first, 100)]
    first.set_epoch(1)
    order1 = [ident(ex) for ex in islice(first, 100)]
    assert order0 != order1 and len(set(order0)) == 100
    again = prepare_stream(ds, "image", seed=3, shuffle_buffer_size=200)
    assert [ident(ex) for ex in islice(again, 100)] == order0
    again.set_epoch(1)
    assert [ident(ex) for ex in islice(again, 100)] == order1
    other_seed = prepare_stream(ds, "image", seed=4, shuffle_buffer_size=200)
    assert [ident(ex) for ex in islice(other_seed, 100)] != order0
    plain = [ident(ex) for ex in islice(prepare_stream(ds, "image", shuffle=False), 100)]
    assert plain == [ident(ex) for ex in islice(ds.decode(False), 100)]


@pytest.mark.parametrize("num_processes", [1, 2])
def test_max_samples_is_a_global_cap(parquet_dir, num_processes):
    ds = load_image_dataset(str(parquet_dir))
    parts = _ranks(ds, num_processes, key=lambda ex: ex["id"], label_column="id", max_samples=7)
    ids = sum(parts, [])
    assert len(ids) == len(set(ids)) == 7
