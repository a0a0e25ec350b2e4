"""The package as users install it from a wheel (not editable): the model card template ships
inside it, and publishing works from the installed copy alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.hub.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("modeling_barlow", "training", "hub", "barlow_cli")


@pytest.mark.slow
def test_publish_runs_from_an_installed_wheel(tmp_path):
    source = tmp_path / "source"  # a clean copy: building in place would write build/ into the checkout
    source.mkdir()
    for name in ("setup.py", "README.md", "model_card.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(source)], capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site / "hub" / "model_card.md").is_file()

    model_dir = tmp_path / "run"
    tiny_model().save_pretrained(model_dir)
    script = textwrap.dedent(f"""
        import hub
        assert hub.__file__.startswith({str(site)!r}), hub.__file__  # the installed copy, not the checkout
        from hub import publish
        result = publish({str(model_dir)!r}, repo_id="me/tiny", local_dir={str(tmp_path / "repo")!r})
        print(result.encoder_format)
    """)
    # The wheel's copy comes first on the path; the checkout is not the working directory.
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "timm"
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "barlow-twins" in card and "me/tiny" in card
