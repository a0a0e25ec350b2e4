"""Publishing Barlow Twins encoders to the Hugging Face Hub (export, model cards, conversion).

* `export_model` / `export_timm_encoder` / `export_encoder_with_code` / `export_full_model`:
  repository folders. The encoder goes into timm's hub format when timm can rebuild it (loads
  with no custom code in timm and transformers), else into our classes with their code files.
* `create_model_card`: the README.md with hub metadata, hyperparameters, results, usage, citation.
* `publish`: all of it for a training output folder, and the upload (`barlow-publish`).
* `convert_checkpoint`: the authors' released checkpoints (`barlow-convert`).
"""

import warnings


# `python -m hub.publish` imports this package, which imports hub.publish, before running that
# module as __main__; runpy then warns about the second copy. It is harmless here (main() only
# uses its own copy), and the eager imports below keep `hub.publish` the function, not the module.
warnings.filterwarnings(
    "ignore", message=r"'hub\.(publish|convert_official)' found in sys.modules", category=RuntimeWarning
)

from .convert_official import convert_checkpoint, load_official_checkpoint, official_to_model  # noqa: E402
from .export import (  # noqa: E402
    EXPORT_FORMATS,
    ExportResult,
    export_encoder,
    export_encoder_with_code,
    export_full_model,
    export_model,
    export_timm_encoder,
    load_barlow_model,
)
from .model_card import create_model_card, eval_results_from_metrics, read_eval_metrics, read_training_args  # noqa: E402
from .timm_format import TimmExportError, timm_incompatibility, verify_timm_export  # noqa: E402
from .publish import PublishError, PublishResult, publish, push_folder, write_repository  # noqa: E402


__all__ = [
    "EXPORT_FORMATS",
    "ExportResult",
    "PublishError",
    "PublishResult",
    "TimmExportError",
    "convert_checkpoint",
    "create_model_card",
    "eval_results_from_metrics",
    "export_encoder",
    "export_encoder_with_code",
    "export_full_model",
    "export_model",
    "export_timm_encoder",
    "load_barlow_model",
    "load_official_checkpoint",
    "official_to_model",
    "publish",
    "push_folder",
    "read_eval_metrics",
    "read_training_args",
    "timm_incompatibility",
    "verify_timm_export",
    "write_repository",
]
