"""Checkpoints of the pretraining loop: atomic saves, from_pretrained on a checkpoint, and resuming
with the same losses, the whole training time, and a log history that names each step once."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from transformers import AutoModel

import modeling_barlow.modeling_barlow_twins as modeling
from tests.training.pretraining_inputs import TINY, history
from tests.cli import returning
from training.pretrain import main

pretrain = returning(main, "metrics.json")


# 96 examples in 4 files, batches of 16: 6 steps per epoch. Step 3 is mid-epoch; step 6 is the
# epoch's last batch, saved before the loader found the epoch exhausted (nothing of it is left to
# read); step 9 is in the middle of epoch 1, whose shards come in another order than epoch 0's
# (loaded into memory and made a stream of shards, a skip() would read them in epoch 0's order).
# With workers, each one's augmentations are seeded per batch; with 2 of them step 9 is one batch
# more from the first worker than from the second. With 3 workers over the 4 files (48, 24 and 24
# images) in batches of 8, the last two run out after 9 steps, and step 11 has 5 batches from the
# first worker: only the counts in the checkpoint tell it (even turns would say 4).
@pytest.mark.parametrize("saved_at, total, options", [
    (3, 6, []), (6, 8, []), (9, 11, ["--no_streaming"]),
    (3, 5, ["--dataloader_num_workers", "1"]), (9, 11, ["--dataloader_num_workers", "2", "--no_streaming"]),
    (11, 12, ["--dataloader_num_workers", "3", "--per_device_train_batch_size", "8"]),
])
def test_resume_continues_with_the_same_losses(tmp_path, parquet_folder, saved_at, total, options):
    common = ["--dataset_name", str(parquet_folder), "--max_train_steps", str(total),
              "--checkpointing_steps", str(saved_at), *TINY, *options]
    full = tmp_path / "full"
    main([*common, "--output_dir", str(full)])
    # The state at step `saved_at` of the same run is what an interruption there would have left.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / f"checkpoint-{saved_at}", resumed / f"checkpoint-{saved_at}")
    state_file = resumed / f"checkpoint-{saved_at}" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["wall_time_s"] > 0  # the first part recorded its time
    # As if the first part had taken 1000 s: a total that left it out could not pass by chance.
    state["wall_time_s"] = before = 1000.0
    state_file.write_text(json.dumps(state))
    started = time.perf_counter()
    metrics = pretrain([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    elapsed = time.perf_counter() - started  # this part's time, measured here around the whole command
    expected = {h["step"]: h["train_loss"] for h in history(full)}
    got = {h["step"]: h["train_loss"] for h in history(resumed)}
    assert sorted(got) == list(range(saved_at + 1, total + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step
    assert expected[saved_at + 1] != pytest.approx(expected[saved_at], rel=1e-3)  # not trivially flat
    # The time a run reports covers its earlier part too, from the checkpoint it resumed; this part's
    # own time is no longer than the command took.
    assert 0 < metrics["wall_time_s"] <= elapsed
    assert before < metrics["total_wall_time_s"] <= before + elapsed


def test_checkpoints_load_with_from_pretrained(tmp_path, parquet_folder):
    out = tmp_path / "run"
    main(["--dataset_name", str(parquet_folder), "--max_train_steps", "4", "--checkpointing_steps", "2",
          "--output_dir", str(out), *TINY])
    final = modeling.BarlowTwinsForPreTraining.from_pretrained(out).state_dict()
    last = modeling.BarlowTwinsForPreTraining.from_pretrained(out / "checkpoint-4").state_dict()
    middle = modeling.BarlowTwinsForPreTraining.from_pretrained(out / "checkpoint-2").state_dict()
    assert last.keys() == final.keys()
    for name, tensor in final.items():
        assert torch.equal(last[name], tensor), name
    # An earlier checkpoint holds that step's weights, not the run's final ones.
    assert not torch.equal(middle["projector.0.weight"], final["projector.0.weight"])
    # The encoder alone too, as barlow-eval and feature extraction load it.
    encoder = AutoModel.from_pretrained(out / "checkpoint-2")
    assert torch.equal(encoder.backbone.conv1.weight, middle["barlow_twins.backbone.conv1.weight"])


def test_partial_checkpoint_is_never_latest(tmp_path):
    from training.shared.checkpointing import STATE_FILE, find_latest_checkpoint

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-9").mkdir()  # no state file: interrupted before it was renamed complete
    (tmp_path / ".checkpoint-12.partial").mkdir()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_save_total_limit_removes_an_old_checkpoint_only_once_the_new_one_is_complete(tmp_path):
    from accelerate import Accelerator

    from training.shared.checkpointing import TrainerState, list_checkpoints, save_checkpoint

    accelerator = Accelerator(cpu=True)

    def names() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir())

    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, TrainerState(global_step=step), save_total_limit=2)
    assert names() == ["checkpoint-1", "checkpoint-2"]
    seen = []

    def while_writing(folder):  # runs while checkpoint-3 is written, before it is renamed into place
        seen.append((folder.name, names()))

    save_checkpoint(accelerator, tmp_path, TrainerState(global_step=3), save_extra=while_writing, save_total_limit=2)
    assert seen == [(".checkpoint-3.partial", [".checkpoint-3.partial", "checkpoint-1", "checkpoint-2"])]
    assert names() == ["checkpoint-2", "checkpoint-3"]

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    # A save that fails before it is complete removes no older checkpoint.
    with pytest.raises(OSError):
        save_checkpoint(accelerator, tmp_path, TrainerState(global_step=4), save_extra=full_disk, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-2"]


def test_resume_in_the_same_folder_logs_each_step_once(tmp_path, parquet_folder):
    # A run killed after step 5 had logged steps 1-5 (the last line torn) but saved only step 3.
    common = ["--dataset_name", str(parquet_folder), "--max_train_steps", "6", "--checkpointing_steps", "3", *TINY]
    full = tmp_path / "full"
    main([*common, "--output_dir", str(full)])
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    lines = (full / "log_history.jsonl").read_text().splitlines()
    (killed / "log_history.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])

    main([*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    logged = history(killed)
    assert [h["step"] for h in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[:3] == history(full)[:3]  # what stood at the checkpoint is kept as it was
    for got, expected in zip(logged[3:], history(full)[3:]):
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)


def test_resume_at_the_last_step_keeps_the_final_metrics(tmp_path, parquet_folder):
    # The run finished and saved its last checkpoint; resuming again has nothing to train, and must
    # not replace the losses in metrics.json with nothing.
    common = ["--dataset_name", str(parquet_folder), "--max_train_steps", "4", "--checkpointing_steps", "2", *TINY]
    out = tmp_path / "run"
    first = pretrain([*common, "--output_dir", str(out)])
    last_logged = history(out)[-1]
    again = pretrain([*common, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert [h["step"] for h in history(out)] == [1, 2, 3, 4]
    assert again["global_step"] == 4 and again["train_loss"] == last_logged["train_loss"] == first["train_loss"]
    assert json.loads((out / "metrics.json").read_text())["train_loss"] == last_logged["train_loss"]
