"""barlow-finetune's own parts, called by `training/finetune.py` once it has parsed the options:
:func:`run_finetuning` and :func:`finetune` (:mod:`.run`, the classification body); its options
(:mod:`.arguments`: :class:`FinetuningArguments`, :func:`check_finetuning_options`); whole-network
classifier training and evaluation (:mod:`.classifier`: :func:`classifier_optimizer`,
:func:`fit_classifier`, :func:`evaluate_classifier`), which barlow-eval's semi-supervised protocol
uses too; and detection and segmentation (:mod:`.dense`, run as `--task object-detection` or
`semantic-segmentation`, chosen by :func:`requested_task` among :data:`DENSE_TASKS`).
"""

from .arguments import FinetuningArguments, check_finetuning_options
from .classifier import classifier_optimizer, evaluate_classifier, fit_classifier
from .dense.arguments import DENSE_TASKS, requested_task
from .run import finetune, run_finetuning

__all__ = [
    "DENSE_TASKS",
    "FinetuningArguments",
    "check_finetuning_options",
    "classifier_optimizer",
    "evaluate_classifier",
    "finetune",
    "fit_classifier",
    "requested_task",
    "run_finetuning",
]
