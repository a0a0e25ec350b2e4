"""barlow-embed, run as users run it: the installed script on real (digit) images, checked against
the model's own forward pass on the same images, computed here with transformers' Auto classes."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from tests.training.embedding.conftest import info, run_cli
from tests.training.pretraining_inputs import digit_images


def reference_embeddings(model_dir, images) -> np.ndarray:
    """pooler_output of AutoModel on AutoImageProcessor's pixels: what a user computes by hand."""
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        return model(**processor([im.convert("RGB") for im in images], return_tensors="pt")).pooler_output.numpy()


def test_parquet_ids_are_split_indices_and_vectors_match_the_model(barlow_model, parquet_folder, tmp_path):
    out = tmp_path / "emb"
    result = run_cli("barlow-embed", "--model_name_or_path", str(barlow_model), "--dataset_name", str(parquet_folder),
                     "--output_dir", str(out), "--keep_columns", "note", "digit", "--rows_per_shard", "40",
                     "--per_device_eval_batch_size", "16", "--dataloader_num_workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    table = datasets.load_dataset(str(out), split="train")
    assert set(table.column_names) == {"embedding", "id", "digit", "note"}
    assert table.features["embedding"] == datasets.List(datasets.Value("float32"), length=32)
    ids = table["id"]
    assert sorted(ids) == list(range(96))  # every example once, though 2 loader workers read 4 files
    assert all(note == f"row {i}" for i, note in zip(ids, table["note"]))
    pairs = digit_images(96)
    assert [pairs[i][1] for i in ids] == table["digit"]
    expected = reference_embeddings(barlow_model, [pairs[i][0] for i in ids])
    np.testing.assert_allclose(np.asarray(table["embedding"]), expected, rtol=1e-4, atol=1e-5)
    record = info(out)
    assert record["count"] == 96 and record["skipped"] == 0 and record["dimension"] == 32
    assert record["dtype"] == "float32" and record["normalisation"] == "none" and record["key"] == "id"
    assert record["pooling"] == "BarlowTwinsModel.pooler_output" and record["command"].startswith("barlow-embed ")
    # A shard is written when a batch takes it to 40 rows or more: 48 (3 batches of 16), then 48.
    assert record["shards"] == 2 and len(list((out / "data").glob("*.parquet"))) == 2


def test_bf16_and_channels_last_give_the_fp32_embeddings_to_bf16_precision(barlow_model, parquet_folder, tmp_path):
    out = tmp_path / "emb"
    result = run_cli("barlow-embed", "--model_name_or_path", str(barlow_model), "--dataset_name", str(parquet_folder),
                     "--output_dir", str(out), "--mixed_precision", "bf16", "--channels_last",
                     "--per_device_eval_batch_size", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    table = datasets.load_dataset(str(out), split="train")
    assert table.features["embedding"] == datasets.List(datasets.Value("float32"), length=32)
    pairs = digit_images(96)
    expected = reference_embeddings(barlow_model, [pairs[i][0] for i in table["id"]])
    got = np.asarray(table["embedding"])
    # bf16 keeps 8 bits of mantissa: each vector within a few per cent of fp32's, and pointing the same way.
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.999
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())
    assert not np.array_equal(got, expected)  # autocast did run in bf16
    assert info(out)["mixed_precision"] == "bf16" and info(out)["count"] == 96


def test_image_folder_keys_by_path_skips_the_corrupt_file_and_stores_float16(barlow_model, image_folder, tmp_path):
    out = tmp_path / "emb"
    result = run_cli("barlow-embed", "--model_name_or_path", str(barlow_model), "--train_dir", str(image_folder),
                     "--output_dir", str(out), "--embedding_dtype", "float16", "--l2_normalize")
    assert result.returncode == 0, result.stderr[-3000:]
    table = datasets.load_dataset(str(out), split="train")
    files = sorted(str(p.relative_to(image_folder)) for p in image_folder.rglob("*.png") if p.name != "corrupt.png")
    assert sorted(table["path"]) == files
    assert table.features["embedding"].feature == datasets.Value("float16")
    expected = reference_embeddings(barlow_model, [Image.open(image_folder / p) for p in table["path"]])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(table["embedding"], dtype=np.float32), expected, atol=2e-3)
    assert [int(p.split("/")[0]) for p in table["path"]] == [int(table.features["label"].names[y]) for y in table["label"]]
    record = info(out)
    assert (record["count"], record["skipped"], record["key"]) == (len(files), 1, "path")
    assert record["dtype"] == "float16" and record["normalisation"] == "l2"


def test_the_same_command_resumes_after_the_last_complete_shard(barlow_model, parquet_folder, tmp_path):
    out = tmp_path / "emb"
    command = ["--model_name_or_path", str(barlow_model), "--dataset_name", str(parquet_folder), "--output_dir",
               str(out), "--rows_per_shard", "16", "--per_device_eval_batch_size", "8"]
    assert run_cli("barlow-embed", *command).returncode == 0
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 6
    # An interrupted run: complete shards only (the last two were never written), no embedding_info.json.
    for path in shards[4:]:
        path.unlink()
    (out / "embedding_info.json").unlink()
    kept = {path: path.stat().st_mtime_ns for path in shards[:4]}
    before = datasets.load_dataset(str(out), split="train")
    result = run_cli("barlow-embed", *command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming: 64 examples" in result.stderr
    assert {path: path.stat().st_mtime_ns for path in shards[:4]} == kept  # not redone
    after = datasets.load_dataset(str(out), split="train")
    assert sorted(after["id"]) == list(range(96))
    assert sorted(before["id"]) == list(range(64))
    # Every row, those kept and those written after the resume, is the model's own embedding.
    pairs = digit_images(96)
    expected = reference_embeddings(barlow_model, [pairs[i][0] for i in after["id"]])
    np.testing.assert_allclose(np.asarray(after["embedding"]), expected, rtol=1e-4, atol=1e-5)
    assert info(out)["count"] == 96 and info(out)["resumed"] is True


def test_a_different_embedding_in_the_folder_is_refused_unless_overwritten(barlow_model, tmp_path):
    out = tmp_path / "emb"
    command = ["--model_name_or_path", str(barlow_model), "--max_train_samples", "20", "--output_dir", str(out)]
    assert run_cli("barlow-embed", *command).returncode == 0
    refused = run_cli("barlow-embed", *command, "--embedding_dtype", "float16")
    assert refused.returncode == 2
    assert "other settings (dtype differ)" in refused.stderr and "--overwrite_output_dir" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert info(out)["dtype"] == "float32"  # nothing was lost
    replaced = run_cli("barlow-embed", *command, "--embedding_dtype", "float16", "--overwrite_output_dir")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert info(out)["dtype"] == "float16" and info(out)["count"] == 20


def test_a_timm_local_dir_model(tmp_path, digit_images):
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import save_for_hf

    model = timm.create_model("resnet18", num_classes=0, channels=(8, 16, 16, 32)).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    save_for_hf(model, tmp_path / "timm_model", model_args={"channels": [8, 16, 16, 32]})
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i, image in enumerate(digit_images[:12]):
        image.save(images / f"{i:02d}.png")
    out = tmp_path / "emb"
    result = run_cli("barlow-embed", "--model_name_or_path", f"local-dir:{tmp_path / 'timm_model'}", "--train_dir",
                     str(images.parent), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = datasets.load_dataset(str(out), split="train")
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        expected = model(torch.stack([transform(Image.open(images.parent / p).convert("RGB")) for p in table["path"]]))
    np.testing.assert_allclose(np.asarray(table["embedding"]), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert info(out)["pooling"].startswith("timm")


def test_a_vit_model_matches_the_feature_extraction_pipeline(tmp_path, image_folder):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel, pipeline

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    out = tmp_path / "emb"
    result = run_cli("barlow-embed", "--model_name_or_path", str(tmp_path / "vit"), "--train_dir", str(image_folder),
                     "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = datasets.load_dataset(str(out), split="train")
    extractor = pipeline("image-feature-extraction", model=str(tmp_path / "vit"))
    for path, embedding in list(zip(table["path"], table["embedding"]))[:5]:
        expected = np.asarray(extractor(Image.open(image_folder / path).convert("RGB"), pool=True)).reshape(-1)
        np.testing.assert_allclose(embedding, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["no_pooled_output", "missing_column"])
def test_bad_input_gets_one_clear_line(case, barlow_model, tmp_path):
    model = str(barlow_model)
    extra: list[str] = []
    if case == "no_pooled_output":
        from transformers import SegformerConfig, SegformerImageProcessor, SegformerModel

        config = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3],
                                 strides=[2], num_attention_heads=[1], mlp_ratios=[2])
        SegformerModel(config).save_pretrained(tmp_path / "segformer")
        SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "segformer")
        model = str(tmp_path / "segformer")
    else:
        extra = ["--keep_columns", "caption"]
    result = run_cli("barlow-embed", "--model_name_or_path", model, "--output_dir", str(tmp_path / "emb"),
                     "--max_train_samples", "8", *extra)
    assert result.returncode == 2  # a model or an option to change (1 before #35)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("barlow-embed: error:")
    expected = {"no_pooled_output": "no pooled output", "missing_column": "--keep_columns caption"}[case]
    assert expected in last
    if case == "no_pooled_output":
        assert "barlow-pretrain folders" in last and "TimmWrapper" in last  # says which models work


@pytest.mark.slow
def test_two_processes_split_the_stream_without_duplicates(barlow_model, parquet_folder, tmp_path):
    out = tmp_path / "emb"
    result = run_cli("torchrun", "--nproc_per_node", "2", "--master_port", "29547", "-m", "training.embedding.embed",
                     "--model_name_or_path", str(barlow_model), "--dataset_name", str(parquet_folder),
                     "--output_dir", str(out), "--per_device_eval_batch_size", "8", "--dataloader_num_workers", "1",
                     timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name.split("-")[1] for p in (out / "data").glob("*.parquet")) == ["r000", "r001"]
    table = datasets.load_dataset(str(out), split="train")
    assert sorted(table["id"]) == list(range(96))
    pairs = digit_images(96)
    expected = reference_embeddings(barlow_model, [pairs[i][0] for i in table["id"]])
    np.testing.assert_allclose(np.asarray(table["embedding"]), expected, rtol=1e-4, atol=1e-5)
    assert info(out)["num_processes"] == 2 and info(out)["count"] == 96
