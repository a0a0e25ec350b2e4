"""barlow-publish: turn a Barlow Twins training output into a Hugging Face Hub repository.

    barlow-publish --model_dir out --repo_id <user>/barlow-resnet50 --local_dir repo      # write only
    barlow-publish --model_dir out --repo_id <user>/barlow-resnet50 --push --eval_results eval.json

The repository folder holds the encoder (in timm's format when timm can rebuild it, so it loads
with no custom code in timm and transformers), optionally the full pretraining model, and a model
card (README.md) with metadata, hyperparameters, results, usage and citation. `--push` uploads it
(token from HF_TOKEN or `hf auth login`). The same code is the Python API `publish()`, which the
trainers' --push_to_hub calls.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError

from modeling_barlow import BarlowTwinsForImageClassification, BarlowTwinsPreTrainedModel
from barlow_cli import UsageError, parse_arguments, prepare_output_dir, run_command, setup_logging

from .export import EXPORT_FORMATS, ExportResult, export_model, load_barlow_model
from .model_card import create_model_card, read_eval_metrics, read_training_args


try:  # the HTTP client's base error (connection failures), re-exported by huggingface_hub
    from huggingface_hub.errors import HTTPError as HubTransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    HubTransportError = OSError


__all__ = [
    "PublishArguments",
    "PublishError",
    "PublishResult",
    "main",
    "publish",
    "prepare_output_folder",
    "push_folder",
    "write_repository",
]

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload Barlow Twins model"


class PublishError(RuntimeError):
    """The upload failed: no token, rejected token, missing namespace or revision, no network."""


@dataclass
class PublishArguments:
    """What to publish, where, and how."""

    model_dir: str | None = field(
        default=None,
        metadata={
            "help": "A barlow-pretrain (or fine-tuning) output folder, or any save_pretrained folder (required)."
        },
    )
    repo_id: str | None = field(default=None, metadata={"help": "The hub repository, <user or org>/<name>."})
    local_dir: str | None = field(
        default=None, metadata={"help": "Write the repository folder here (kept after --push)."}
    )
    push: bool = field(
        default=False, metadata={"help": "Upload the folder to --repo_id (token from HF_TOKEN or the login)."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repository as private (if it does not exist)."})
    revision: str | None = field(
        default=None, metadata={"help": "Upload to this branch (created if needed) instead of main."}
    )
    commit_message: str = field(default=DEFAULT_COMMIT_MESSAGE, metadata={"help": "The commit message."})
    eval_results: str | None = field(
        default=None,
        metadata={"help": "A barlow-eval metrics JSON (linear_top1, knn_top1, ... as fractions) for the card."},
    )
    format: str = field(
        default="encoder",
        metadata={
            "help": "encoder: the encoder (timm format when possible); full: encoder and projector (trust_remote_code); "
            "both: the encoder at the root and the full model in pretraining/.",
            "choices": list(EXPORT_FORMATS),
        },
    )
    license: str = field(
        default="apache-2.0", metadata={"help": "The hub license id of the weights, e.g. apache-2.0, mit."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The hub dataset the model was trained on (card metadata); read from the run when not given."
        },
    )
    overwrite_local_dir: bool = field(
        default=False, metadata={"help": "Empty --local_dir first when it already holds files."}
    )

    def __post_init__(self):
        _check_options(self.model_dir, self.repo_id, self.local_dir, self.push, self.format)


@dataclass
class PublishResult:
    """What `publish` did: the folder written (None when it was a temporary one, deleted after
    the upload), its layout, and the URL when pushed."""

    folder: Path | None
    encoder_format: Literal["timm", "transformers"] | None
    pretraining_subfolder: str | None
    url: str | None = None


def _check_options(model_dir: Any, repo_id: str | None, local_dir: Any, push: bool, format: str) -> None:
    if not model_dir:
        raise ValueError("--model_dir is required: the output folder of barlow-pretrain or of a fine-tuning run.")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}.")
    if push and not repo_id:
        raise ValueError("--push needs --repo_id (<user or org>/<name>).")
    if not push and not local_dir:
        raise ValueError(
            "Nothing to do: give --local_dir to write the repository folder, --push to upload it, or both."
        )
    if repo_id:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise ValueError(f"--repo_id {repo_id!r}: {error}") from None


def prepare_output_folder(
    folder: str | Path, *, source: Any = None, overwrite: bool = False, option: str = "--local_dir"
) -> Path:
    """Create `folder`, refusing a non-empty one (its stale files would be published too) unless
    `overwrite`, and refusing one that holds `source`, the model being exported."""
    path = Path(folder).resolve()
    if isinstance(source, (str, Path)):
        source_path = Path(source).resolve()
        if path == source_path or path in source_path.parents:
            raise UsageError(f"{option} {folder} holds the model folder {source}: choose a separate folder.")
    return prepare_output_dir(path, ("*", ".*"), overwrite=overwrite, option=option,
                              overwrite_option=option.replace("--", "--overwrite_"),
                              holds="is not empty, and its old files would be published with the new ones")


def _base_model(training_args: dict[str, Any] | None) -> str | None:
    # A run that started from a hub model names it; a local folder is not a hub reference.
    name = (training_args or {}).get("model_name_or_path")
    if isinstance(name, str) and name.count("/") == 1 and not Path(name).exists():
        return name
    return None


def publish(
    model_dir: str | Path | BarlowTwinsPreTrainedModel,
    repo_id: str | None = None,
    local_dir: str | Path | None = None,
    push: bool = False,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    eval_results: str | Path | dict[str, Any] | None = None,
    format: Literal["encoder", "full", "both"] = "encoder",
    license: str = "apache-2.0",
    dataset_name: str | None = None,
    base_model: str | None = None,
    overwrite_local_dir: bool = False,
    token: str | None = None,
) -> PublishResult:
    """Write a hub repository folder for a Barlow Twins model and, with `push=True`, upload it.

    Args:
        model_dir: a training output folder (its `training_args.json` and `metrics.json` go into
            the card), any Barlow Twins `save_pretrained` folder, or a model instance.
        repo_id: `<user or org>/<name>`; the card's snippets load it. Required with `push`.
        local_dir: where to write the folder; a temporary folder when only pushing.
        push, private, revision, commit_message: the upload (see `push_folder`).
        eval_results: a `barlow-eval` metrics JSON path or dict for the card and its model-index.
        format: `"encoder"`, `"full"` or `"both"` (see `hub.export.export_model`).
        license, dataset_name, base_model: card metadata.
        overwrite_local_dir: empty a non-empty `local_dir` first instead of refusing.
        token: a hub token; defaults to HF_TOKEN or the stored login.

    Returns:
        A `PublishResult` with the folder, its layout and, when pushed, the repository URL.

    Example:
        >>> from hub import publish
        >>> publish("out", repo_id="me/barlow-resnet18", local_dir="repo")  # doctest: +SKIP
    """
    _check_options(model_dir, repo_id, local_dir, push, format)
    eval_metrics = read_eval_metrics(eval_results) if isinstance(eval_results, (str, Path)) else eval_results
    if push and not (token or get_token()):
        raise PublishError(_NO_TOKEN)  # before the export, which can take minutes for large models
    model = load_barlow_model(model_dir)
    training_args, run_metrics = read_training_args(model_dir) if isinstance(model_dir, (str, Path)) else (None, None)
    card_options = dict(
        repo_id=repo_id,
        eval_metrics=eval_metrics,
        training_args=training_args,
        run_metrics=run_metrics,
        dataset_name=dataset_name,
        license=license,
        base_model=base_model or _base_model(training_args),
    )
    with tempfile.TemporaryDirectory(prefix="barlow-publish-") as temporary:
        # Only pushing: the folder is temporary and goes away after the upload.
        folder = (
            prepare_output_folder(local_dir, source=model_dir, overwrite=overwrite_local_dir)
            if local_dir
            else Path(temporary)
        )
        exported = write_repository(model, folder, format=format, **card_options)
        result = PublishResult(folder if local_dir else None, exported.encoder_format, exported.pretraining_subfolder)
        if push:
            result.url = push_folder(
                folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
            )
    return result


def write_repository(
    model: BarlowTwinsPreTrainedModel,
    folder: str | Path,
    *,
    format: Literal["encoder", "full", "both"] = "encoder",
    training_source: str | None = None,
    notes: list[str] | None = None,
    **card_options: Any,
) -> ExportResult:
    """Export `model` into `folder` (see `hub.export.export_model`) and write its model card,
    README.md; `card_options` go to `hub.model_card.create_model_card`."""
    folder = Path(folder)
    exported = export_model(model, folder, format)
    label_names = None
    if isinstance(model, BarlowTwinsForImageClassification):
        label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    card = create_model_card(
        model.config,
        encoder_format=exported.encoder_format,
        pretraining_subfolder=exported.pretraining_subfolder,
        local_dir=folder,
        label_names=label_names,
        training_source=training_source,
        notes=notes,
        **card_options,
    )
    card.save(folder / "README.md")
    logger.info(f"Wrote the repository folder {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    return exported


_NO_TOKEN = "No Hugging Face token: set HF_TOKEN or run `hf auth login` with a token that has write access."


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    token: str | None = None,
) -> str:
    """Create `repo_id` if needed (`exist_ok=True`), create branch `revision` if given, and upload
    `folder` in one commit. Returns the repository URL. Hub failures become `PublishError`s that
    say what to fix (401: the token; 403: write access; 404: namespace or revision)."""
    token = token or get_token()
    if not token:
        raise PublishError(_NO_TOKEN)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision)
    except OfflineModeIsEnabled:
        raise PublishError("HF_HUB_OFFLINE=1 is set, so nothing can be uploaded. Unset it to --push.") from None
    except HfHubHTTPError as error:
        raise PublishError(_http_error_message(error, repo_id, revision)) from None
    except HubTransportError as error:
        raise PublishError(
            f"Could not reach the hub to upload {repo_id}: {error}. Check the network or HF_ENDPOINT."
        ) from None
    url = str(repo_url).rstrip("/")
    return f"{url}/tree/{revision}" if revision and revision != "main" else url


def _http_error_message(error: HfHubHTTPError, repo_id: str, revision: str | None) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    detail = getattr(error, "server_message", None) or str(error).splitlines()[0]
    if status == 401:
        return f"The hub rejected the token (401 Unauthorized): set a valid HF_TOKEN or run `hf auth login`. ({detail})"
    if status == 403:
        return f"The token may not write to {repo_id!r} (403 Forbidden): use a token with write access to that namespace. ({detail})"
    if status == 404:
        where = f" or the revision {revision!r}" if revision else ""
        return (
            f"Not found (404): the namespace of {repo_id!r}{where} does not exist or the token cannot see it; "
            f"check --repo_id (<your user or an org you belong to>/<name>). ({detail})"
        )
    return f"The hub refused the upload of {repo_id!r} (HTTP {status}): {detail}"


def main(argv: list[str] | None = None) -> None:
    """The `barlow-publish` command. Bad options and inputs exit with code 2, failures with code 1, both
    with a one-line message instead of a traceback."""
    (args,) = parse_arguments((PublishArguments,), argv, description=__doc__)
    setup_logging()

    def run() -> None:
        result = publish(**asdict(args))
        if result.folder:
            print(f"Repository folder: {result.folder}")
        if result.encoder_format == "timm":
            print("The encoder is in timm's format: it loads without custom code in timm and transformers.")
        if result.url:
            print(f"Uploaded: {result.url}")

    run_command("barlow-publish", run, expected=(SafetensorError, PublishError))


if __name__ == "__main__":
    main()
