"""barlow-eval's own parts, called by `training/evaluate.py` once it has parsed the options:
:func:`run_evaluation` and :func:`evaluate` (:mod:`.run`, the command's body); its options
(:mod:`.arguments`: :class:`EvaluationArguments`); feature extraction and kNN (:mod:`.features`:
:func:`extract_features`, :func:`knn_top1`, :func:`knn_topk_accuracy`), which pretraining's kNN
monitor uses too; and the linear probes with their feature cache (:mod:`.probes`:
:func:`sgd_linear_probe`, :func:`exact_linear_probe`).
"""

from .arguments import EvaluationArguments
from .features import extract_features, knn_top1, knn_topk_accuracy
from .probes import exact_linear_probe, sgd_linear_probe
from .run import evaluate, run_evaluation

__all__ = [
    "EvaluationArguments",
    "evaluate",
    "exact_linear_probe",
    "extract_features",
    "knn_top1",
    "knn_topk_accuracy",
    "run_evaluation",
    "sgd_linear_probe",
]
