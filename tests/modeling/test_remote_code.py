"""A saved folder loads with trust_remote_code in a process where modeling_barlow cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from modeling_barlow import BarlowTwinsForPreTraining


CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_barlow"] = None  # any import of this project now fails
    import torch
    from transformers import AutoBackbone, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    folder, inputs, result = sys.argv[1:4]
    try:
        import modeling_barlow
        raise SystemExit("modeling_barlow was importable")
    except ImportError:
        pass
    x = torch.load(inputs)
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    backbone_class = get_class_from_dynamic_module("modeling_barlow_twins.BarlowTwinsBackbone", folder)
    direct = backbone_class.from_pretrained(folder, out_indices=[4]).eval()
    # transformers 5's AutoBackbone.from_pretrained asks the hub whether the name is a repository
    # before reading anything, which fails for every local folder (importing modeling_barlow works
    # around it). Here the hub's answer for a repository is stood in for, as it would come online.
    import transformers.models.auto.auto_factory as auto_factory
    auto_factory.hf_api = lambda: type("Hub", (), {"repo_exists": staticmethod(lambda name: True)})()
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    pretraining = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
    classifier = AutoModelForImageClassification.from_pretrained(folder, num_labels=3, trust_remote_code=True)
    backbone = AutoBackbone.from_pretrained(folder, out_indices=[1, 3, 4], trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save({
            "pooled": encoder(x).pooler_output,
            "projections": pretraining(x).projections,
            "logits_shape": list(classifier.eval()(x).logits.shape),
            "feature_maps": list(backbone(x).feature_maps),
            "channels": backbone.channels,
            "direct_last_map": direct(x).feature_maps[0],
            "classes": [type(m).__module__ + "." + type(m).__name__ for m in (encoder, pretraining, classifier, backbone)],
        }, result)
    """
)


def test_trust_remote_code_load_without_the_package(tmp_path, tiny_config):
    model = BarlowTwinsForPreTraining(tiny_config).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {
        "AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification", "AutoBackbone"
    }
    for name in ("configuration_barlow_twins.py", "modeling_barlow_twins.py", "loss.py", "timm_network.py",
                 "classification_loss.py"):
        assert (folder / name).exists(), name

    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert all("modeling_barlow." not in name for name in result["classes"]), result["classes"]
    with torch.no_grad():
        torch.testing.assert_close(result["pooled"], model.barlow_twins(x).pooler_output)
        torch.testing.assert_close(result["projections"], model(x).projections)
    assert result["logits_shape"] == [2, 3]
    # The stages straight from timm, on the saved network.
    stages = model.barlow_twins.backbone.forward_intermediates(x, indices=[1, 3, 4], intermediates_only=True)
    assert result["channels"] == [16, 64, 128]
    torch.testing.assert_close(result["direct_last_map"], stages[-1])
    assert len(result["feature_maps"]) == 3
    for got, expected in zip(result["feature_maps"], stages):
        torch.testing.assert_close(got, expected)
