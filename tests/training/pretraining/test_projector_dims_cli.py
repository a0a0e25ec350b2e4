"""`--projector_dims` in the authors' spelling (`8192-8192-8192`, their `--projector`) as well as one
width per word, through the installed `barlow-pretrain` in a subprocess."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from tests.cli import script
from tests.training.pretraining_inputs import TINY

USAGE = 2


def _tiny_with_projector(*widths: str) -> list[str]:
    at = TINY.index("--projector_dims")
    return [*TINY[:at], "--projector_dims", *widths, *TINY[at + 3:]]  # TINY gives two widths


def test_dashed_widths_build_that_projector(tmp_path):
    result = script("barlow-pretrain", *_tiny_with_projector("48-40-24"), "--max_train_steps", "1",
                    "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["projector_dims"] == [48, 40, 24]
    # The network that was built and saved, read from its weights: Linear(F, 48), Linear(48, 40), Linear(40, 24).
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        shapes = [tuple(weights.get_slice(f"projector.{i}.weight").get_shape()) for i in (0, 3, 6)]
    assert [shape[0] for shape in shapes] == [48, 40, 24] and shapes[1][1] == 48 and shapes[2][1] == 40


@pytest.mark.parametrize("widths", [("48--40",), ("48", "forty")])
def test_wrong_widths_are_a_one_line_usage_error(tmp_path, widths):
    result = script("barlow-pretrain", *_tiny_with_projector(*widths), "--max_train_steps", "1",
                    "--output_dir", tmp_path / "run")
    assert result.returncode == USAGE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "--projector_dims takes widths as '8192 8192 8192' or '8192-8192-8192'" in last, last
    assert not (tmp_path / "run").exists()
