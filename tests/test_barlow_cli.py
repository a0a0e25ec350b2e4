"""barlow_cli in process (fast; `make mutate` runs these against its mutants): option parsing with
--config, the exit status and one-line message of each outcome, and the output-folder policy.
The commands' own tests run the same code as users do, in subprocesses."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import pytest

import barlow_cli.output_dir as output_dir_module
from barlow_cli import CommandFailed, UsageError, parse_arguments, prepare_output_dir, read_config_file, run_command
from barlow_cli.command import EXIT_FAILED, EXIT_USAGE, setup_logging
from barlow_cli.output_dir import remove_empty_folders_made


@dataclass
class Model:
    width: int = 8
    kwargs: str | None = field(default=None, metadata={"help": "JSON of keyword arguments."})
    name: str = "resnet"

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"--width must be >= 1, got {self.width}.")


@dataclass
class Run:
    steps: list[int] = field(default_factory=lambda: [1])
    fast: bool = False


# --------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_config_files_in_yaml_or_json(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_text('{"width": 3, "steps": [4, 5]}')  # JSON is YAML too
    assert read_config_file(path) == {"width": 3, "steps": [4, 5]}
    assert read_config_file(str(path)) == {"width": 3, "steps": [4, 5]}


@pytest.mark.parametrize("name, text, message", [
    ("run.yaml", "width: [1\n", "--config {path} is not valid YAML: "),
    ("run.yml", "width: [1\n", "--config {path} is not valid YAML: "),
    ("run.json", "width: 1", "--config {path} is not valid JSON: "),
    ("run.txt", "{", "--config {path} is not valid JSON: "),
    ("run.yaml", "- 1\n", "--config {path} must hold a mapping of option names to values."),
    ("run.json", "null", "--config {path} must hold a mapping of option names to values."),
])
def test_unreadable_config_files_say_why(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_config_file(path)
    assert str(error.value).startswith(message.format(path=path))


def test_a_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match=f"^--config {tmp_path / 'no.yaml'}: no such file.$"):
        read_config_file(tmp_path / "no.yaml")
    with pytest.raises(ValueError, match="no such file"):
        read_config_file(tmp_path)  # a folder is not a config file


def test_options_from_the_command_line_and_a_config_file(tmp_path):
    model, run = parse_arguments((Model, Run), [])
    assert model == Model() and run == Run()
    config = tmp_path / "run.yaml"
    config.write_text("width: 3\nkwargs: {depth: 2}\nname: vit\nsteps: [4, 5]\nfast: true\n")
    model, run = parse_arguments((Model, Run), ["--config", str(config)])
    # A mapping for a string option arrives as its JSON text, as typed on the command line.
    assert model == Model(width=3, kwargs='{"depth": 2}', name="vit") and run == Run(steps=[4, 5], fast=True)
    model, run = parse_arguments((Model, Run), ["--config", str(config), "--width", "6", "--steps", "7"])
    assert model.width == 6 and run.steps == [7] and model.name == "vit"  # the command line wins


def test_string_options_are_recognised_by_their_annotation():
    from barlow_cli.arguments import _is_string_field

    # Annotations arrive as strings under `from __future__ import annotations`, as in the commands.
    for annotation in (str, "str", "str | None", "str|None", "Optional[str]"):
        assert _is_string_field(annotation), annotation
    for annotation in (int, "int", "list[str]", "str | int", "bool", None):
        assert not _is_string_field(annotation), annotation


def test_help_shows_the_description_defaults_and_config(capsys):
    with pytest.raises(SystemExit) as done:
        parse_arguments((Model, Run), ["--help"], description="A test command.")
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "A test command." in text
    assert "--kwargs KWARGS JSON of keyword arguments. (default: None)" in text  # argparse's defaults formatter
    assert "--config CONFIG YAML or JSON file of options; command-line options win. (default: None)" in text


def test_the_command_line_is_read_when_no_argv_is_given(monkeypatch):
    monkeypatch.setattr("sys.argv", ["barlow-test", "--width", "5"])
    assert parse_arguments((Model,))[0].width == 5


def test_option_errors_are_usage_errors_with_one_line(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"width": 2, "depth": 1, "colour": 0}')
    cases = [
        (["--config", str(config)], f"--config {config}: unknown options colour, depth."),
        (["--width", "0"], "--width must be >= 1, got 0."),
        (["--width", "many"], "argument --width: invalid int value: 'many'"),
        (["--config", str(tmp_path / "none.yaml")], "no such file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stopped:
            parse_arguments((Model, Run), argv, description="A test command.")
        assert stopped.value.code == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert err.strip().splitlines()[-1].endswith("error: " + message) or message == "no such file"


# -------------------------------------------------------------------------------- exit statuses
@pytest.mark.parametrize("error, status, message", [
    (UsageError("bad --thing"), EXIT_USAGE, "bad --thing"),
    (FileNotFoundError("Model folder no-model does not exist."), EXIT_USAGE, "Model folder no-model does not exist."),
    (ValueError("no such split\n  'dev'\n"), EXIT_FAILED, "no such split 'dev'"),
    (OSError("disk full"), EXIT_FAILED, "disk full"),
    (CommandFailed("stopped by SIGTERM"), EXIT_FAILED, "stopped by SIGTERM"),
    (KeyboardInterrupt(), EXIT_FAILED, "interrupted (Ctrl-C)."),
    (ValueError(""), EXIT_FAILED, "ValueError"),
])
def test_each_outcome_has_its_status_and_one_line(error, status, message, capsys):
    def body():
        raise error

    with pytest.raises(SystemExit) as stopped:
        run_command("barlow-test", body)
    assert stopped.value.code == status
    assert capsys.readouterr().err == f"barlow-test: error: {message}\n"


def test_success_returns_none_and_bugs_keep_their_traceback(capsys):
    assert run_command("barlow-test", lambda: 42) is None
    assert capsys.readouterr().err == ""

    class Expected(Exception):
        pass

    def failing():
        raise Expected("known")

    with pytest.raises(SystemExit) as stopped:
        run_command("barlow-test", failing, expected=(Expected,))
    assert stopped.value.code == EXIT_FAILED and capsys.readouterr().err == "barlow-test: error: known\n"
    with pytest.raises(Expected):  # not expected by this command: a bug, raised as it is
        run_command("barlow-test", failing)


def test_logging_setup(monkeypatch):
    calls = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: calls.append(kwargs))
    setup_logging()
    setup_logging(logging.WARNING)
    assert calls == [
        {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s", "datefmt": "%H:%M:%S", "level": level}
        for level in (logging.INFO, logging.WARNING)
    ]


# ------------------------------------------------------------------------------- output folders
RUN_FILES = ("model.safetensors", "checkpoint-*", "metrics.json")


def _earlier_run(folder):
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoint-1" / "state.json").write_text("{}")
    (folder / "model.safetensors").write_text("weights")
    (folder / "notes.txt").write_text("mine")


def test_a_new_folder_is_made_and_taken_away_again_when_the_command_fails(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert prepare_output_dir(tmp_path / "a" / "b", RUN_FILES) == tmp_path / "a" / "b"
    assert prepare_output_dir(str(existing / "c"), RUN_FILES) == existing / "c"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())  # the write test left nothing
    (existing / "c" / "kept.txt").write_text("written")
    remove_empty_folders_made()
    assert not (tmp_path / "a").exists()  # made here and still empty: both levels went
    assert (existing / "c" / "kept.txt").is_file()  # something was written there
    assert not output_dir_module._folders_made
    remove_empty_folders_made()  # nothing left to do


def test_folders_that_cannot_be_used(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match=f"^--out {a_file} is a file; give a folder \\(it is created if missing\\).$"):
        prepare_output_dir(a_file, RUN_FILES, option="--out")
    with pytest.raises(UsageError, match=f"^--output_dir {a_file / 'run'} cannot be written \\(Not a directory\\); choose a folder"):
        prepare_output_dir(a_file / "run", RUN_FILES)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as root: every folder is writable")
        with pytest.raises(UsageError, match="cannot be written \\(Permission denied\\)"):
            prepare_output_dir(read_only, RUN_FILES)
    finally:
        read_only.chmod(0o755)


def test_an_earlier_run_is_refused_named_and_left_untouched(tmp_path):
    _earlier_run(tmp_path)
    with pytest.raises(UsageError) as refused:
        prepare_output_dir(tmp_path, RUN_FILES, resume_hint="--resume_from_checkpoint latest to continue it")
    assert str(refused.value) == (
        f"--output_dir {tmp_path} holds an earlier run (checkpoint-1, model.safetensors). Choose another folder, or "
        "pass --overwrite_output_dir to replace it or --resume_from_checkpoint latest to continue it.")
    with pytest.raises(UsageError) as refused:
        prepare_output_dir(tmp_path, ("*",), option="--local_dir", overwrite_option="--overwrite_local_dir",
                           holds="is not empty")
    assert str(refused.value) == (f"--local_dir {tmp_path} is not empty (checkpoint-1, model.safetensors, notes.txt). "
                                  "Choose another folder, or pass --overwrite_local_dir to replace it.")
    (tmp_path / "notes.txt").unlink()
    for index in range(2, 5):  # five: all named
        (tmp_path / f"checkpoint-{index}").mkdir()
    with pytest.raises(UsageError, match=r"\(checkpoint-1, checkpoint-2, checkpoint-3, checkpoint-4, model.safetensors\)\."):
        prepare_output_dir(tmp_path, RUN_FILES)
    (tmp_path / "checkpoint-5").mkdir()  # six: the first five and "..."
    with pytest.raises(UsageError, match=r"\(checkpoint-1, checkpoint-2, checkpoint-3, checkpoint-4, checkpoint-5, \.\.\.\)"):
        prepare_output_dir(tmp_path, RUN_FILES)
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "model.safetensors").read_text() == "weights"
    assert prepare_output_dir(tmp_path, RUN_FILES, resume=True) == tmp_path  # resuming keeps everything
    assert prepare_output_dir(tmp_path, RUN_FILES, resume=True, overwrite=True) == tmp_path
    assert len(list(tmp_path.glob("checkpoint-*"))) == 5 and (tmp_path / "model.safetensors").is_file()


def test_overwrite_removes_only_the_earlier_runs_files(tmp_path, monkeypatch, caplog):
    _earlier_run(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "checkpoint-link").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("RANK", "1")  # another process of a launch: the main one removes them
    prepare_output_dir(tmp_path, RUN_FILES, overwrite=True)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoint-1").is_dir()
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.INFO, logger="barlow_cli.output_dir"):
        prepare_output_dir(tmp_path, RUN_FILES, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "notes.txt"]  # a link goes, not its target
    assert f"--overwrite_output_dir: removed the earlier run's 3 files and folders from {tmp_path}." in caplog.text
    monkeypatch.delenv("RANK")
    _earlier_run(tmp_path)
    prepare_output_dir(tmp_path, RUN_FILES, overwrite=True)  # no RANK: a single process is the main one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "notes.txt"]
