"""barlow-publish: the repository folder, every step up to the upload call, and clear errors.

No hub is contacted: HfApi's methods are replaced by recorders, and HF_ENDPOINT points nowhere.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

from hub import PublishError, publish
from .helpers import TINY
from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, create_image_processor


# `hub.publish` is the function; the module is reached through sys.modules.
publish_module = importlib.import_module("hub.publish")
# huggingface_hub's HTTP client (httpx2 in 2.x, httpx in 1.x), to build the responses it raises with.
http_client = importlib.import_module(HTTPError.__module__.split(".")[0])



@pytest.fixture
def run_dir(tmp_path) -> Path:
    folder = tmp_path / "run"
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**TINY))
    model.save_pretrained(folder)
    create_image_processor(model.config).save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps({"backbone": "resnet18", "learning_rate_weights": 0.2}))
    return folder


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def hub_recorder(monkeypatch, no_network):
    """Replace HfApi's network calls; record their arguments and the folder's files at upload time."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs, self.token))

    def upload_folder(self, **kwargs):
        files = sorted(
            str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file()
        )
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}, self.token))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return calls


def cli_error(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        publish_module.main(argv)
    code = exit_info.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # sys.exit(message): Python prints it and exits with 1
        return 1, code + err
    return code, err


def test_local_dir_holds_an_encoder_that_plain_timm_loads(run_dir, tmp_path):
    result = publish(run_dir, repo_id="me/tiny", local_dir=tmp_path / "repo")
    assert result.url is None and result.encoder_format == "timm"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    import timm

    network = timm.create_model(f"local-dir:{tmp_path / 'repo'}", pretrained=True).eval()
    model = BarlowTwinsForPreTraining.from_pretrained(run_dir).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(network(x), model.barlow_twins(x).pooler_output, atol=1e-5, rtol=1e-5)


def test_push_creates_the_repo_then_uploads_the_folder(run_dir, tmp_path, hub_recorder, capsys):
    assert None is publish_module.main(
        [
            "--model_dir",
            str(run_dir),
            "--repo_id",
            "me/tiny",
            "--local_dir",
            str(tmp_path / "repo"),
            "--push",
            "--private",
            "--revision",
            "v1",
            "--commit_message",
            "first",
            "--format",
            "both",
        ]
    )
    assert [call[0] for call in hub_recorder] == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = hub_recorder
    assert create[1] == "me/tiny" and create[2] == {"private": True, "exist_ok": True}
    assert branch[2]["branch"] == "v1" and branch[2]["exist_ok"] is True
    assert upload[2]["folder_path"] == str(tmp_path / "repo") and upload[2]["commit_message"] == "first"
    assert upload[2]["revision"] == "v1"
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "pretraining/config.json",
        "pretraining/model.safetensors",
    } <= set(upload[2]["files"])
    assert all(call[3] == "hf_test_token" for call in hub_recorder)  # the token came from HF_TOKEN
    assert "Uploaded: https://huggingface.co/me/tiny/tree/v1" in capsys.readouterr().out


def test_push_without_local_dir_uploads_a_temporary_folder(run_dir, hub_recorder):
    result = publish(run_dir, repo_id="me/tiny", push=True)
    (upload,) = [call for call in hub_recorder if call[0] == "upload_folder"]
    assert {"README.md", "config.json", "model.safetensors"} <= set(upload[2]["files"])
    assert result.folder is None and not Path(upload[2]["folder_path"]).exists()
    assert result.url == "https://huggingface.co/me/tiny"


def test_missing_token_is_a_clear_error_before_any_export(run_dir, tmp_path, monkeypatch, no_network):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PublishError, match="HF_TOKEN"):
        publish(run_dir, repo_id="me/tiny", local_dir=tmp_path / "repo", push=True)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "status, message",
    [(401, "rejected the token"), (403, "write access"), (404, "namespace of 'me/tiny'"), (500, "HTTP 500")],
)
def test_hub_http_errors_are_explained(run_dir, tmp_path, hub_recorder, monkeypatch, capsys, status, message):
    def refuse(self, repo_id, **kwargs):
        request = http_client.Request("POST", "https://huggingface.co/api/repos/create")
        response = http_client.Response(status, request=request)
        raise HfHubHTTPError(f"{status} Client Error", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    code, err = cli_error(
        capsys, ["--model_dir", str(run_dir), "--repo_id", "me/tiny", "--local_dir", str(tmp_path / "repo"), "--push"]
    )
    assert code == 1 and message in err and "Traceback" not in err
    assert (tmp_path / "repo" / "README.md").is_file()  # the folder is kept for a retry


def test_offline_mode_is_explained(run_dir, tmp_path, hub_recorder, monkeypatch):
    def offline(self, repo_id, **kwargs):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish(run_dir, repo_id="me/tiny", push=True)


def test_bad_input_exits_with_a_message_not_a_traceback(run_dir, tmp_path, capsys):
    repo = str(tmp_path / "repo")
    code, err = cli_error(capsys, ["--local_dir", repo])
    assert code == 2 and "--model_dir is required" in err
    code, err = cli_error(capsys, ["--model_dir", str(run_dir), "--push"])
    assert code == 2 and "--repo_id" in err
    code, err = cli_error(capsys, ["--model_dir", str(run_dir), "--repo_id", "not/a/repo", "--local_dir", repo])
    assert code == 2 and "--repo_id" in err
    code, err = cli_error(capsys, ["--model_dir", str(tmp_path / "missing"), "--local_dir", repo])
    # Inputs to change, status 2 (1 before #35): a missing folder, one of another model, a bad JSON.
    assert code == 2 and "no such folder" in err
    not_barlow = tmp_path / "not_barlow"
    not_barlow.mkdir()
    (not_barlow / "config.json").write_text(json.dumps({"model_type": "vit"}))
    code, err = cli_error(capsys, ["--model_dir", str(not_barlow), "--local_dir", repo])
    assert code == 2 and "not a Barlow Twins model" in err
    (tmp_path / "eval.json").write_text('{"linear_top1": 0.7,')
    code, err = cli_error(
        capsys, ["--model_dir", str(run_dir), "--local_dir", repo, "--eval_results", str(tmp_path / "eval.json")]
    )
    assert code == 2 and "not valid JSON" in err
    code, err = cli_error(capsys, ["--model_dir", str(run_dir), "--local_dir", str(run_dir)])
    assert code == 2 and "separate folder" in err  # an option to change: a usage error
    for text in (err,):
        assert "Traceback" not in text
    assert not Path(repo).exists()


def test_corrupt_weights_exit_with_a_message(run_dir, tmp_path, capsys):
    (run_dir / "model.safetensors").write_bytes(b"not safetensors")
    code, err = cli_error(capsys, ["--model_dir", str(run_dir), "--local_dir", str(tmp_path / "repo")])
    assert code == 1 and "barlow-publish: error: Could not load" in err and "Traceback" not in err


def test_local_dir_with_files_is_refused_unless_overwritten(run_dir, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stale.bin").write_text("old")
    with pytest.raises(ValueError, match="not empty"):
        publish(run_dir, local_dir=repo)
    publish(run_dir, local_dir=repo, overwrite_local_dir=True, format="full")
    assert not (repo / "stale.bin").exists()
    tensors = safetensors.torch.load_file(repo / "model.safetensors")
    assert any(key.startswith("projector.") for key in tensors)
    # Without a repo id the card's snippets load the folder itself.
    assert str(repo.resolve()) in (repo / "README.md").read_text()
