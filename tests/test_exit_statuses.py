"""The exit-status rule, as a shell script reads it: 0 done, 1 failed, 2 an option or input to
change, each failure with a short stderr (no traceback, the error on the last line). Every case
runs the installed console script in a subprocess; the cases run side by side, since most of each
one's time is importing torch and transformers."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli import script
from tests.conftest import TINY_RESNET

FAILED, USAGE = 1, 2
# Logging set-up and a library warning may come before the error line; a usage dump or a traceback
# (dozens of lines) may not.
MAX_STDERR_LINES = 8


def _encoder_folder(root: Path) -> Path:
    from modeling_barlow import BarlowTwinsConfig, BarlowTwinsModel, create_image_processor

    folder = root / "encoder"
    model = BarlowTwinsModel(BarlowTwinsConfig(**TINY_RESNET, image_size=32))
    model.save_pretrained(folder)
    create_image_processor(model.config).save_pretrained(folder)
    return folder


def _train_split_only(root: Path, digit_images) -> Path:
    """An imagefolder with train/ and nothing held out (no validation/ or test/)."""
    for index, image in enumerate(digit_images[:6]):
        folder = root / "train_only" / "train" / str(index % 2)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    return root / "train_only"


# name: (command and arguments, with {tmp} for the case's folder; status; what stderr's last line says).
# A missing model folder for barlow-eval and barlow-finetune and a file that is no checkpoint for
# barlow-convert are in tests/training/test_commands.py.
CASES: dict[str, tuple[list[str], int, str]] = {
    "embed_missing_model": (["barlow-embed", "--model_name_or_path", "{tmp}/no-model", "--output_dir", "{tmp}/emb"],
                            USAGE, "barlow-embed: error: Model folder {tmp}/no-model does not exist."),
    "search_missing_index": (["barlow-search", "--index_dir", "{tmp}/no-index", "--query", "{tmp}/a.png"],
                             USAGE, "barlow-search: error: --index_dir {tmp}/no-index: no such folder."),
    "publish_missing_model": (["barlow-publish", "--model_dir", "{tmp}/no-model", "--local_dir", "{tmp}/repo"],
                              USAGE, "barlow-publish: error: {tmp}/no-model: no such folder."),
    "pretrain_missing_train_dir": (["barlow-pretrain", "--train_dir", "{tmp}/no-images", "--output_dir", "{tmp}/run"],
                                   USAGE, "barlow-pretrain: error: train_dir '{tmp}/no-images' is not a directory"),
    "finetune_no_eval_split": (["barlow-finetune", "--model_name_or_path", "{encoder}", "--dataset_name",
                                "{train_only}", "--output_dir", "{tmp}/clf"],
                               USAGE, "pass --eval_split."),
    "usage_error": (["barlow-finetune", "--backbone", "resnt50"],
                    USAGE, "barlow-finetune: error: unrecognized arguments: --backbone resnt50"),
    # accelerate's launcher gives 1 for any failure of the script it runs (a 2 included); with
    # --quiet it adds no traceback of its own. The README says so and shows the direct form first.
    "accelerate_launch_quiet": (["accelerate", "launch", "--quiet", "--num_processes", "1", "--num_machines", "1",
                                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.finetune",
                                 "--model_name_or_path", "{tmp}/no-model", "--output_dir", "{tmp}/clf"],
                                FAILED, "barlow-finetune: error: Model folder {tmp}/no-model does not exist."),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, digit_images) -> dict[str, tuple[subprocess.CompletedProcess, dict[str, str]]]:
    """Every case's finished process and the values put into its arguments."""
    shared = tmp_path_factory.mktemp("inputs")
    values = {"encoder": str(_encoder_folder(shared)), "train_only": str(_train_split_only(shared, digit_images))}

    def run(name: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
        folder = tmp_path_factory.mktemp(name)
        (folder / "notes.txt").write_text("hello, this is not a checkpoint\n")
        filled = {**values, "tmp": str(folder)}
        command, *args = (word.format(**filled) for word in CASES[name][0])
        return script(command, *args, timeout=300, cwd=folder), filled

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.parametrize("case", list(CASES))
def test_each_outcome_exits_with_its_status_and_a_short_stderr(results, case):
    result, filled = results[case]
    _, status, message = CASES[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) <= MAX_STDERR_LINES, result.stderr[-3000:]
    assert message.format(**filled) in lines[-1]
    assert result.stdout == ""


def test_a_usage_error_prints_one_short_usage_line_and_the_error(results):
    result, _ = results["usage_error"]
    assert result.stderr.splitlines() == [
        "usage: barlow-finetune [-h] ... (--help lists every option)",
        "barlow-finetune: error: unrecognized arguments: --backbone resnt50",
    ]


@pytest.mark.parametrize("module, prog", [
    ("training.pretrain", "barlow-pretrain"), ("training.evaluate", "barlow-eval"),
    ("training.finetune", "barlow-finetune"), ("training.finetuning.dense.finetune", "barlow-finetune"),
    ("training.embedding.embed", "barlow-embed"), ("training.embedding.search", "barlow-search"),
    ("hub.publish", "barlow-publish"), ("hub.convert_official", "barlow-convert"),
])
def test_every_command_prints_the_short_usage(module, prog, capsys, monkeypatch):
    # In process (the subprocess case above covers one command as users run it): argparse names
    # the program after sys.argv[0], as the console script's name.
    import importlib

    monkeypatch.setattr("sys.argv", [prog])
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(module).main(["--no_such_option"])
    assert stopped.value.code == USAGE
    assert capsys.readouterr().err.splitlines() == [
        f"usage: {prog} [-h] ... (--help lists every option)",
        f"{prog}: error: unrecognized arguments: --no_such_option",
    ]
