"""The package as users install it from a wheel (not editable): the model card template ships
inside it, and publishing works from the installed copy alone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.hub.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("modeling_barlow", "training", "hub", "barlow_cli")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built as a wheel from a clean copy and installed into its own folder (scripts in bin/)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    return site


def _entry_points() -> dict[str, str]:
    """setup.py's console scripts: name -> module (read from the file, not from the installed metadata)."""
    return dict(re.findall(r'"(barlow-[a-z]+)=([\w.]+):main"', (ROOT / "setup.py").read_text(encoding="utf-8")))


@pytest.mark.slow
def test_every_entry_point_of_the_installed_wheel_prints_its_help(installed, tmp_path):
    """Each console script, and `python -m` of each command module (the form `accelerate launch -m`
    runs), from the installed copy alone: --help exits with 0 and prints the command's usage."""
    scripts = _entry_points()
    assert len(scripts) == 7 and "training.pretrain" in scripts.values()
    # -S: no site-packages .pth files, so the checkout's editable install cannot fill in what the wheel
    # lacks; the installed copy, then the dependencies, are the whole path. The checkout is not the cwd.
    python = [sys.executable, "-S"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), sysconfig.get_paths()["purelib"]]),
           "HF_HUB_OFFLINE": "1"}
    commands = {name: [*python, str(installed / "bin" / name), "--help"] for name in scripts}
    commands |= {f"-m {module}": [*python, "-m", module, "--help"] for module in scripts.values()}
    where = (f"import importlib, sys; [importlib.import_module(m) for m in {sorted(scripts.values())!r}]; "
             "print(*[m.__file__ for n, m in sys.modules.items() if n.split('.')[0] in {'training', 'hub'}])")
    located = subprocess.run([*python, "-c", where], capture_output=True, text=True, cwd=tmp_path, env=env)
    files = located.stdout.split()
    assert located.returncode == 0 and len(files) > 20, located.stderr[-3000:]
    assert all(path.startswith(str(installed)) for path in files), [p for p in files if not p.startswith(str(installed))]

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(commands, pool.map(run, commands.values())))
    failed = {name: (result.returncode, result.stderr[-1500:]) for name, result in results.items()
              if result.returncode != 0 or not result.stdout.startswith("usage:")}
    assert not failed, failed


@pytest.mark.slow
def test_publish_runs_from_an_installed_wheel(installed, tmp_path):
    site = installed
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
