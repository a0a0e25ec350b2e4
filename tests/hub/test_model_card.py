"""The published README.md: valid YAML metadata, the run's hyperparameters and results, and usage
snippets that run as written (by repo id, from a populated hub cache, without this project)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from hub import publish
from .helpers import TINY, populate_hub_cache, run_isolated
from hub.model_card import eval_results_from_metrics, read_eval_metrics
from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, create_image_processor


# What barlow-pretrain writes (a subset), with values no default would produce.
TRAINING_ARGS = {
    "dataset_name": "barlow-test/pets",
    "train_dir": None,
    "model_name_or_path": None,
    "backbone": "resnet18",
    "backbone_kwargs": '{"channels": [8, 16, 16, 32]}',
    "small_image_stem": False,
    "projector_dims": "16-16",
    "off_diagonal_weight": 0.0037,
    "loss_scale": 1.0,
    "image_size": 32,
    "per_device_train_batch_size": 64,
    "num_train_epochs": 7.0,
    "optimizer": "lars",
    "learning_rate_weights": 0.37,
    "learning_rate_biases": 0.0059,
    "weight_decay": 2.5e-06,
    "warmup_epochs": 1.0,
    "mixed_precision": "bf16",
    "seed": 1234,
    "output_dir": "/secret/local/path",
    "global_batch_size": 128,
    "num_processes": 2,
}
EVAL = {
    "linear_top1": 0.8123,
    "linear_top5": 0.9871,
    "knn_top1": 0.7456,
    "semi_10pct_top1": 0.6512,
    "dataset_name": "barlow-test/pets-eval",
}


def training_output(folder: Path, **overrides) -> BarlowTwinsForPreTraining:
    """A folder like barlow-pretrain's output_dir: model, image processor, arguments, metrics."""
    model = BarlowTwinsForPreTraining(BarlowTwinsConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(folder)
    create_image_processor(model.config).save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps(TRAINING_ARGS))
    (folder / "metrics.json").write_text(json.dumps({"global_step": 321, "train_loss": 12.5, "epochs": 7.0}))
    return model


def front_matter(readme: Path) -> tuple[dict, str]:
    text = readme.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert match, "README.md must start with a YAML block between --- lines"
    return yaml.safe_load(match[1]), match[2]


def test_card_metadata_and_body(tmp_path):
    training_output(tmp_path / "run")
    (tmp_path / "eval.json").write_text(json.dumps(EVAL))
    publish(
        tmp_path / "run",
        repo_id="me/barlow-tiny",
        local_dir=tmp_path / "repo",
        eval_results=tmp_path / "eval.json",
        format="both",
        license="cc-by-4.0",
    )
    metadata, body = front_matter(tmp_path / "repo" / "README.md")

    assert metadata["library_name"] == "timm"
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert {"barlow-twins", "self-supervised"} <= set(metadata["tags"])
    assert metadata["license"] == "cc-by-4.0"
    assert metadata["datasets"] == ["barlow-test/pets"]
    (entry,) = metadata["model-index"]
    values = {m["name"]: m["value"] for result in entry["results"] for m in result["metrics"]}
    assert values == {
        "Linear probe top-1 accuracy": EVAL["linear_top1"],
        "Linear probe top-5 accuracy": EVAL["linear_top5"],
        "kNN top-1 accuracy": EVAL["knn_top1"],
        "Fine-tuned on 10% of the labels top-1 accuracy": EVAL["semi_10pct_top1"],
    }
    assert {result["dataset"]["name"] for result in entry["results"]} == {"barlow-test/pets-eval"}

    # Hyperparameters come from the run's training_args.json and metrics.json; local paths stay out.
    for text in ("`0.37`", "`0.0059`", "`2.5e-06`", "`0.0037`", "`bf16`", "`1234`", "`321`", "`16-16`"):
        assert text in body, text
    assert "/secret/local/path" not in body
    assert re.search(r"\| Linear probe \| barlow-test/pets-eval \| 81\.2 \| 98\.7 \|", body)
    assert re.search(r"\| kNN \| barlow-test/pets-eval \| 74\.6 \| - \|", body)
    for section in (
        "## Model description",
        "## Training",
        "## Evaluation",
        "## How to use",
        "## Limitations",
        "## Citation",
    ):
        assert section in body
    assert "Barlow Twins: Self-Supervised Learning via Redundancy Reduction" in body and "2103.03230" in body
    assert "Zbontar, Jure and Jing, Li and Misra, Ishan and LeCun, Yann and Deny" in body


def test_eval_metrics_are_read_tolerantly_and_checked(tmp_path):
    results = eval_results_from_metrics({"knn_top1": 0.5, "epochs": 3}, dataset_name="d")
    assert [(r.metric_name, r.metric_value, r.dataset_name) for r in results] == [("kNN top-1 accuracy", 0.5, "d")]
    assert eval_results_from_metrics({}) == []
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_eval_metrics(tmp_path / "bad.json")
    (tmp_path / "percent.json").write_text(json.dumps({"linear_top1": 73.5}))
    with pytest.raises(ValueError, match="fraction"):
        read_eval_metrics(tmp_path / "percent.json")
    (tmp_path / "list.json").write_text("[0.5]")
    with pytest.raises(ValueError, match="JSON object"):
        read_eval_metrics(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError):
        read_eval_metrics(tmp_path / "missing.json")


def test_card_shows_mean_std_and_min_over_seeds(tmp_path):
    """An eval_results.json of `barlow-eval --seeds 0 1 2` (its keys; values chosen here): the card's
    table shows mean ± std (min) as numpy computes them, and the model-index holds the mean."""
    per_seed = {"linear_top1": [0.812, 0.797, 0.805], "linear_top5": [0.991, 0.988, 0.990], "knn_top1": [0.74] * 3}
    metrics = {"seeds": [0, 1, 2], "per_seed": per_seed, "dataset_name": "barlow-test/pets-eval"}
    for key, values in per_seed.items():
        values = np.array(values)
        metrics |= {key: values.mean(), f"{key}_mean": values.mean(), f"{key}_std": values.std(ddof=1),
                    f"{key}_min": values.min()}
    training_output(tmp_path / "run")
    (tmp_path / "eval.json").write_text(json.dumps(metrics))
    publish(tmp_path / "run", repo_id="me/barlow-tiny", local_dir=tmp_path / "repo", eval_results=tmp_path / "eval.json")
    metadata, body = front_matter(tmp_path / "repo" / "README.md")

    def cell(key: str) -> str:
        values = 100 * np.array(per_seed[key])
        return f"{values.mean():.1f} ± {values.std(ddof=1):.1f} (min {values.min():.1f})"

    assert f"| Linear probe | barlow-test/pets-eval | {cell('linear_top1')} | {cell('linear_top5')} |" in body
    assert f"| kNN | barlow-test/pets-eval | {cell('knn_top1')} | - |" in body
    assert "over 3 evaluation seeds (0, 1, 2)" in body
    (entry,) = metadata["model-index"]
    values = {m["name"]: m["value"] for result in entry["results"] for m in result["metrics"]}
    assert values["Linear probe top-1 accuracy"] == pytest.approx(np.mean(per_seed["linear_top1"]))
    assert len(values) == 3  # the summaries are not results of their own
    (tmp_path / "percent.json").write_text(json.dumps({**metrics, "linear_top1_mean": 80.5}))
    with pytest.raises(ValueError, match="linear_top1_mean = 80.5 is not a fraction"):
        read_eval_metrics(tmp_path / "percent.json")

CHILD_SNIPPETS = """
import runpy
for _name in ("modeling_barlow", "training", "hub"):
    try:
        __import__(_name)
        raise SystemExit(_name + " is importable")
    except ImportError:
        pass
for path in sys.argv[1:]:
    print("running", path, flush=True)
    runpy.run_path(path, run_name="__main__")
"""


def test_card_snippets_run_as_written(tmp_path, photo):
    cache = tmp_path / "hub_cache"
    snippets = []
    for name, overrides, format in (
        ("tiny-timm", {}, "both"),
        ("tiny-stem", {"small_image_stem": True}, "encoder"),
        ("tiny-full", {}, "full"),
    ):
        training_output(tmp_path / name, **overrides)
        repo_id = f"barlow-test/{name}"
        publish(tmp_path / name, repo_id=repo_id, local_dir=tmp_path / f"{name}-repo", format=format)
        readme = (tmp_path / f"{name}-repo" / "README.md").read_text()
        blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
        assert blocks, name
        libraries = {
            "tiny-timm": ("timm.create_model", "AutoModelForPreTraining"),
            "tiny-stem": ("trust_remote_code=True",),
            "tiny-full": ("AutoModelForPreTraining", "pipeline("),
        }[name]
        for library in libraries:
            assert any(library in block for block in blocks), (name, library)
        if name == "tiny-stem":
            assert not any("timm.create_model" in block for block in blocks)
        populate_hub_cache(cache, repo_id, tmp_path / f"{name}-repo")
        for index, block in enumerate(blocks):
            path = tmp_path / f"snippet_{name}_{index}.py"
            path.write_text(block)
            snippets.append(str(path))
    photo.save(tmp_path / "image.jpg")

    completed = run_isolated(CHILD_SNIPPETS, snippets, tmp_path)
    assert completed.stdout.count("running") == len(snippets)
    assert "torch.Size([1, 32])" in completed.stdout  # the printed feature shapes
