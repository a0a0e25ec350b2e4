"""The five commands as a shell script, a scheduler and a careless user run them: the installed
console scripts in subprocesses, their exit statuses (0 done, 1 failed or stopped, 2 usage
error), one-line errors instead of tracebacks, and nothing done before lost."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.cli import BIN, script
from tests.training.pretraining_inputs import TINY, digit_images, history

OK, FAILED, USAGE = 0, 1, 2


def _tiny(**changes: str) -> list[str]:
    """TINY with some options replaced (argparse would take the last, but explicit is clearer)."""
    args = list(TINY)
    for name, value in changes.items():
        args[args.index(f"--{name}") + 1] = value
    return args


def _without(option: str) -> list[str]:
    """TINY without ``option`` and its value."""
    at = TINY.index(option)
    return TINY[:at] + TINY[at + 2:]


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    """Digits 0-2 as an imagefolder with train/ and test/ splits, and one corrupt training file."""
    root = tmp_path_factory.mktemp("labelled")
    for index, (image, label) in enumerate(digit_images(120)):
        if label > 2:
            continue
        folder = root / ("train" if index < 90 else "test") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    (root / "train" / "1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, parquet_folder) -> Path:
    """A finished barlow-pretrain run with checkpoints every step, of which the newest two are kept."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = script("barlow-pretrain", "--dataset_name", parquet_folder, "--output_dir", out, "--max_train_steps", 3,
                    "--checkpointing_steps", 1, "--save_total_limit", 2, *TINY)
    assert result.returncode == OK, result.stderr[-3000:]
    return out


def _contents(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path: bytes), to tell that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / run.name))


# ------------------------------------------------------------------------------ success is status 0
def test_every_command_exits_0_and_prints_only_what_it_means_to(tmp_path, parquet_folder, labelled_folder):
    run = tmp_path / "run"
    pretrain = script("barlow-pretrain", "--dataset_name", parquet_folder, "--output_dir", run, "--max_train_steps", 2,
                      "--warmup_ratio", 0.5, *_without("--warmup_steps"))
    assert pretrain.returncode == OK, pretrain.stderr[-3000:]
    assert pretrain.stdout == "" and "{'" not in pretrain.stderr  # no result dict printed by the entry point
    args = json.loads((run / "training_args.json").read_text())
    assert args["warmup_steps"] == 1 and args["dataset_is_local"] is True  # --warmup_ratio 0.5 of 2 steps
    logged = history(run)[-1]
    # The width-free numbers beside the loss: mean C_ii, and mean C_ij^2 = off-diagonal sum / (D (D - 1)).
    assert -1 <= logged["c_diagonal_mean"] <= 1
    assert logged["c_off_diagonal_mean_square"] == pytest.approx(logged["off_diagonal_loss"] / (64 * 63), rel=1e-6)

    evaluation = script("barlow-eval", "--model_name_or_path", run, "--dataset_name", labelled_folder,
                        "--protocol", "knn", "--no_cache_features", "--output_dir", tmp_path / "eval")
    assert evaluation.returncode == OK, evaluation.stderr[-3000:]
    assert "knn" in evaluation.stdout and (tmp_path / "eval" / "eval_results.json").is_file()

    finetune = script("barlow-finetune", "--model_name_or_path", run, "--dataset_name", labelled_folder,
                      "--output_dir", tmp_path / "clf", "--num_train_epochs", 1, "--per_device_train_batch_size", 16)
    assert finetune.returncode == OK, finetune.stderr[-3000:]
    assert finetune.stdout == ""
    metrics = json.loads((tmp_path / "clf" / "metrics.json").read_text())
    train_files = [p for p in (labelled_folder / "train").rglob("*.png")]
    # The corrupt file is skipped and counted, not trained on.
    assert metrics["skipped_images"] == 1 and metrics["num_train_examples"] == len(train_files) - 1

    publish = script("barlow-publish", "--model_dir", run, "--local_dir", tmp_path / "repo")
    assert publish.returncode == OK, publish.stderr[-3000:]
    assert publish.stdout.startswith("Repository folder:")
    card = (tmp_path / "repo" / "README.md").read_text()
    header = card.split("---")[1]
    assert "datasets" not in header and str(parquet_folder) not in card  # a local path is no hub dataset
    assert "a local image collection" in card
    assert "| epochs |" not in card and "| epochs run |" in card  # limited by --max_train_steps 2

    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    convert = script("barlow-convert", "--checkpoint", weights, "--output_dir", tmp_path / "converted")
    assert convert.returncode == OK, convert.stderr[-3000:]
    assert convert.stdout.strip() == f"Converted {weights} into {tmp_path / 'converted'}"


# --------------------------------------------------------------------------------- bad data and options
def test_data_that_cannot_train_stops_instead_of_hanging(tmp_path):
    folder = tmp_path / "unreadable" / "0"
    folder.mkdir(parents=True)
    for index in range(12):
        (folder / f"{index}.png").write_bytes(b"not an image at all")
    result = script("barlow-pretrain", "--train_dir", folder.parent, "--output_dir", tmp_path / "run",
                    "--max_train_steps", 5, *_tiny(per_device_train_batch_size="4"), timeout=300)
    assert result.returncode == FAILED
    assert "Epoch 0 gave no batch with two or more readable images (12 images skipped" in result.stderr
    _no_traceback(result)
    small = script("barlow-pretrain", "--output_dir", tmp_path / "run", *_tiny(per_device_train_batch_size="1"))
    assert small.returncode == USAGE and "must be at least 2" in small.stderr


def test_a_named_column_of_image_bytes_trains_and_keeps_everything(tmp_path):
    pairs = digit_images(40)
    encoded = []
    for image, _ in pairs:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    data = tmp_path / "bytes"
    data.mkdir()
    datasets.Dataset.from_dict({"pic": encoded, "label": [label for _, label in pairs]}).to_parquet(
        str(data / "train-00000.parquet"))
    run = tmp_path / "run"
    result = script("barlow-pretrain", "--dataset_name", data, "--image_column", "pic", "--output_dir", run,
                    "--max_train_steps", 2, *TINY)
    assert result.returncode == OK, result.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "metrics.json", "cross_correlation.png"):
        assert (run / name).is_file(), name
    wrong = script("barlow-pretrain", "--dataset_name", data, "--image_column", "label", "--output_dir",
                   tmp_path / "other", "--max_train_steps", 2, *TINY)
    assert wrong.returncode == USAGE and "Column 'label' holds int64 values, not images" in wrong.stderr
    _no_traceback(wrong)


def test_steps_on_a_local_imagefolder_need_no_warmup_option(tmp_path, imagefolder):
    # A streamed imagefolder records no size; its files are counted, so the paper's 10 warm-up epochs
    # resolve (capped at the 2 steps run) instead of a demand for --warmup_steps.
    run = tmp_path / "run"
    result = script("barlow-pretrain", "--train_dir", imagefolder, "--output_dir", run, "--max_train_steps", 2,
                    *_without("--warmup_steps"))
    assert result.returncode == OK, result.stderr[-3000:]
    args = json.loads((run / "training_args.json").read_text())
    assert args["steps_per_epoch"] == 3 and args["warmup_steps"] == 2  # 48 files, batches of 16
    assert "warm-up 2 steps (10 epochs)" in result.stderr


def test_output_folders_that_cannot_be_used_are_usage_errors(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for folder, message in ((a_file, "is a file"), (Path("/proc/barlow-no-such/run"), "cannot be written")):
        result = script("barlow-pretrain", "--output_dir", folder, "--max_train_steps", 1, *TINY)
        assert result.returncode == USAGE and message in result.stderr, result.stderr[-2000:]
        _no_traceback(result)


def test_a_failed_command_leaves_no_empty_folder_of_its_own_making(tmp_path):
    missing_model = tmp_path / "no-such-model"
    existing = tmp_path / "existing"
    existing.mkdir()
    for command in ("barlow-finetune", "barlow-eval"):
        for folder in (tmp_path / command / "new" / "run", existing):
            result = script(command, "--model_name_or_path", missing_model, "--output_dir", folder)
            # A model folder that does not exist is an input to change: status 2 (it was 1 before #35).
            assert result.returncode == USAGE, result.stderr[-2000:]
            assert result.stderr.strip().splitlines()[-1] == f"{command}: error: Model folder {missing_model} does not exist."
            _no_traceback(result)
            assert len(result.stderr.strip().splitlines()) <= 8, result.stderr[-2000:]
        # The folders it made (all three levels) went with the failure; the one that was there stayed.
        assert not (tmp_path / command).exists() and existing.is_dir()


def test_a_failing_final_knn_evaluation_is_logged_not_fatal(tmp_path, parquet_folder, labelled_folder):
    # A kNN dataset whose held-out images are all unreadable: its evaluation at the end fails, after
    # the model is saved. The run still succeeds, with its model, metrics and C plot.
    import shutil

    knn_data = tmp_path / "knn"
    shutil.copytree(labelled_folder / "train", knn_data / "train")
    for label in ("0", "1", "2"):
        (knn_data / "test" / label).mkdir(parents=True)
        (knn_data / "test" / label / "unreadable.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = tmp_path / "run"
    result = script("barlow-pretrain", "--dataset_name", parquet_folder, "--output_dir", run, "--max_train_steps", 1,
                    "--knn_eval_dataset", knn_data, *TINY)
    assert result.returncode == OK, result.stderr[-3000:]
    assert "No final kNN evaluation: test_features must be a non-empty" in result.stderr
    assert "knn_top1" not in json.loads((run / "metrics.json").read_text())
    assert (run / "cross_correlation.png").is_file()
    from modeling_barlow import BarlowTwinsForPreTraining

    assert BarlowTwinsForPreTraining.from_pretrained(run).config.projector_dims == [64, 64]  # the saved model loads


def test_a_finished_run_is_never_mixed_with_a_new_one(tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    # --save_total_limit 2 kept the newest two of three checkpoints.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    before = _contents(run)
    assert "model.safetensors" in before and "checkpoint-3/model.safetensors" in before
    again = script("barlow-pretrain", "--dataset_name", "ignored", "--output_dir", run, *TINY)
    assert again.returncode == USAGE and "holds an earlier run" in again.stderr
    assert "--overwrite_output_dir" in again.stderr and "--resume_from_checkpoint latest" in again.stderr
    assert _contents(run) == before  # untouched: every file as the finished run left it, none added
    (run / "notes.txt").write_text("mine")
    fresh = script("barlow-pretrain", "--output_dir", run, "--overwrite_output_dir", "--max_train_steps", 1, *TINY)
    assert fresh.returncode == OK, fresh.stderr[-3000:]
    # The old run's checkpoints went with it (the new run saves none); the user's own file stayed.
    assert not list(run.glob("checkpoint-*")) and (run / "notes.txt").read_text() == "mine"
    assert [h["step"] for h in history(run)] == [1]


def test_evaluation_and_finetuning_outputs_are_not_overwritten_silently(tmp_path, finished_run):
    eval_dir, clf_dir = tmp_path / "eval", tmp_path / "clf"
    eval_dir.mkdir()
    (eval_dir / "eval_results.json").write_text('{"knn_top1": 0.5}')
    clf_dir.mkdir()
    (clf_dir / "config.json").write_text("{}")
    evaluation = script("barlow-eval", "--model_name_or_path", finished_run, "--output_dir", eval_dir)
    finetune = script("barlow-finetune", "--model_name_or_path", finished_run, "--output_dir", clf_dir)
    for result in (evaluation, finetune):
        assert result.returncode == USAGE and "holds an earlier run" in result.stderr, result.stderr[-2000:]
    assert json.loads((eval_dir / "eval_results.json").read_text()) == {"knn_top1": 0.5}


def test_resume_skips_a_damaged_checkpoint_and_names_a_different_model(tmp_path, finished_run, parquet_folder):
    run = _copy(finished_run, tmp_path)
    weights = run / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a save cut short
    common = ["--dataset_name", str(parquet_folder), "--output_dir", str(run), "--resume_from_checkpoint", "latest"]
    other = script("barlow-pretrain", *common, "--max_train_steps", 4, *TINY, "--projector_dims", "32", "32")
    assert other.returncode == USAGE and "projector_dims [64, 64] there, [32, 32] here" in other.stderr
    _no_traceback(other)
    resumed = script("barlow-pretrain", *common, "--max_train_steps", 4, *TINY)
    assert resumed.returncode == OK, resumed.stderr[-3000:]
    assert "checkpoint-3 is damaged and was skipped" in resumed.stderr
    assert f"Resumed from {run / 'checkpoint-2'} at step 2" in resumed.stderr
    assert [h["step"] for h in history(run)] == [1, 2, 3, 4]


def test_convert_refuses_a_file_that_is_no_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a checkpoint\n")
    result = script("barlow-convert", "--checkpoint", text, "--output_dir", tmp_path / "out")
    # None of the authors' formats: a file to change, status 2 (it was 1 before #35).
    assert result.returncode == USAGE and f"{text} is not a readable PyTorch checkpoint" in result.stderr
    _no_traceback(result)
    assert len(result.stderr.strip().splitlines()) <= 8, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- signals
def _wait_for_steps(run: Path, process: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        log = run / "log_history.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the run logged no step in time")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_a_checkpoint_and_the_resume_command(tmp_path, parquet_folder, signum):
    run = tmp_path / "run"
    args = ["--dataset_name", str(parquet_folder), "--output_dir", str(run), "--max_train_steps", "500", *TINY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([str(BIN / "barlow-pretrain"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    _wait_for_steps(run, process, steps=2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == FAILED, stderr[-3000:]
    assert "Traceback" not in stderr and f"stopped by {signum.name}" in stderr
    (checkpoint,) = run.glob("checkpoint-*")
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert step >= 2 and checkpoint.name == f"checkpoint-{step}"
    command = stderr.split("To resume:\n")[1].splitlines()[0].strip()
    assert command == "barlow-pretrain " + shlex.join([*args, "--resume_from_checkpoint", "latest"])
    # The printed command resumes (here told to stop two steps later).
    words = shlex.split(command)
    resumed = script(words[0], *words[1:], "--max_train_steps", step + 2)
    assert resumed.returncode == OK, resumed.stderr[-3000:]
    assert [h["step"] for h in history(run)] == list(range(1, step + 3))


@pytest.mark.slow
def test_every_process_stops_at_the_same_step(tmp_path, parquet_folder):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "training.pretrain",
               "--dataset_name", str(parquet_folder), "--output_dir", str(run), "--max_train_steps", "500",
               *_tiny(per_device_train_batch_size="8")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_steps(run, process, steps=2, timeout=400)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == FAILED, stderr[-3000:]  # torchrun passes on the processes' status 1
    # One complete checkpoint: saving is collective, so both processes reached it at the same step.
    (checkpoint,) = run.glob("checkpoint-*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert checkpoint.name == f"checkpoint-{state['global_step']}" and state["global_step"] >= 2
    assert stderr.count("stopped by SIGTERM") == 2, stderr[-3000:]


# ------------------------------------------------------------------------------- one-channel encoders
def test_a_one_channel_encoder_works_in_the_feature_extraction_pipeline(tmp_path, parquet_folder):
    from transformers import AutoImageProcessor, AutoModel, pipeline

    import modeling_barlow  # noqa: F401  (registers the Auto classes, as users of the package do)

    run = tmp_path / "run"
    kwargs = json.dumps({"channels": [8, 16, 16, 32], "in_chans": 1})
    result = script("barlow-pretrain", "--dataset_name", parquet_folder, "--output_dir", run, "--max_train_steps", 1,
                    *_tiny(backbone_kwargs=kwargs))
    assert result.returncode == OK, result.stderr[-3000:]
    model = AutoModel.from_pretrained(run).eval()
    assert model.backbone.conv1.in_channels == 1
    extractor = pipeline("image-feature-extraction", model=str(run))
    processor = AutoImageProcessor.from_pretrained(run)
    rgb = Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8))
    for image in (rgb, rgb.convert("L")):
        features = torch.tensor(extractor(image, pool=True))
        # Independently: transformers' stock processor gives RGB; PIL's luminance weights by hand;
        # then timm's network itself.
        pixels = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        assert pixels.shape[1] == 3
        luminance = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        with torch.no_grad():
            expected = model.backbone.forward_head(model.backbone.forward_features(luminance), pre_logits=True)
        torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)
    publish = script("barlow-publish", "--model_dir", run, "--local_dir", tmp_path / "repo")
    assert publish.returncode == OK, publish.stderr[-3000:]
    assert "one-channel images" in (tmp_path / "repo" / "README.md").read_text()
