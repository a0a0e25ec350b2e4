"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester`, the pipeline and image-processor
mixins), imported from the sdist of the installed version that `make test` fetched into the venv
(tests/fetch_transformers_tests.py).

The sdist holds the mixins' files but not four small modules they import from the rest of
transformers' repository; those are stood in for here, each saying what it replaces. The tests are
imported as the package `transformers_common_tests`, since `tests` is ours.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import transformers

from ..fetch_transformers_tests import sdist_tests_dir


PACKAGE = "transformers_common_tests"


def _stand_in(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


class ExportTesterMixin:
    """Stands in for tests/exporters/test_export.py (not in the sdist): torch.export tests don't run."""


class GenerationTesterMixin:
    """Stands in for tests/generation/test_utils.py (not in the sdist). Our models don't generate, and
    ModelTesterMixin checks that a tester of a model that can't generate doesn't inherit this."""


# tests/utils/test_configuration_utils.py's `config_common_kwargs` (not in the sdist), as transformers
# 5.x lists them: every PreTrainedConfig must take and keep these.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


def _url_to_local_path(url: str) -> str:
    """utils/fetch_hub_objects_for_ci.py maps the test photos (COCO's cats, ...) to a CI cache; no hub
    is reachable here, so a photograph that ships with scikit-learn takes their place."""
    if not url.lower().endswith((".jpg", ".jpeg", ".png")):
        raise RuntimeError(f"transformers' test wants {url}, which cannot be fetched offline")
    import sklearn.datasets

    return str(Path(sklearn.datasets.__file__).parent / "images" / "china.jpg")


def load(module: str) -> types.ModuleType:
    """`transformers_common_tests.<module>` (e.g. "test_modeling_common") of the installed version.

    Raises if `make test`'s set-up has not fetched them: a missing sdist must fail the run, not skip it.
    """
    tests_dir = sdist_tests_dir(transformers.__version__)
    if not (tests_dir / "test_modeling_common.py").is_file():
        raise RuntimeError(
            f"transformers {transformers.__version__}'s common tests are not in {tests_dir}. `make test` fetches "
            f"them at set-up; by hand: {sys.executable} tests/fetch_transformers_tests.py"
        )
    if PACKAGE not in sys.modules:
        _register(tests_dir)
    return importlib.import_module(f"{PACKAGE}.{module}")


def _register(tests_dir: Path) -> None:
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests_dir)]
    sys.modules[PACKAGE] = package
    for sub in ("exporters", "generation", "utils"):
        _stand_in(f"{PACKAGE}.{sub}", __path__=[])
    _stand_in(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _stand_in(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _stand_in(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    _stand_in("fetch_hub_objects_for_ci", url_to_local_path=_url_to_local_path)
    # The pipeline mixin reads the summary of the hub's tiny test models at import. Those models
    # can't be downloaded here, so it is pointed (its documented local option) at an empty summary,
    # and each pipeline test skips with transformers' own reason.
    if "TRANSFORMERS_TINY_MODEL_PATH" not in os.environ:
        local = Path(tempfile.mkdtemp(prefix="tiny-models-"))
        (local / "reports").mkdir()
        (local / "reports" / "tiny_model_summary.json").write_text(json.dumps({}))
        os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(local)
    # Two of them import transformers "directly" from a path (`direct_transformers_import`): the tests
    # folder, whose __init__.py the sdist leaves out (empty in the repository), and the source tree
    # beside it. An empty __init__.py at each gives back the installed transformers, already imported
    # (executing its real __init__ a second time would replace the module everyone else holds).
    for folder in (tests_dir, tests_dir.parent / "src" / "transformers"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").touch()
