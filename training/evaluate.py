"""Evaluate a pretrained encoder: linear probe, kNN and semi-supervised fine-tuning.

    barlow-eval --model_name_or_path out --protocol linear knn semi --output_dir eval
    python -m training.evaluate --model_name_or_path out --output_dir eval   # digits, linear and kNN

Writes eval_results.json (accuracies as fractions) into --output_dir and prints a table. Features
are computed once per model, data and preprocessing, and cached on disk. `--seeds 0 1 2` repeats
every probe per seed on the same features and reports each metric's mean, sample standard
deviation and minimum (`linear_top1_mean`, `_std`, `_min`; `linear_top1` is the mean) with the
per-seed values (`per_seed`).

* linear: the backbone frozen in eval mode. `--linear_solver sgd` (default) is the paper's
  protocol on features computed once (SGD, momentum 0.9, lr 0.3, weight decay 1e-6, batch 256,
  100 epochs, per-step cosine, head N(0, 0.01)); `lbfgs` fits an exact logistic regression on
  standardised features; `--linear_augment` trains on random resized crops and flips of the
  images at every epoch instead (the full protocol; no cache).
* knn: cosine similarity of L2-normalised features, the k nearest vote with exp(sim / T).
* semi: the whole network fine-tuned on class-balanced fractions of the labels (chosen with
  `--seed`), backbone and head with their own learning rates.

Exit status: 0 done, 1 failed, 2 an option or input to change.
"""

from __future__ import annotations

from barlow_cli import parse_arguments, run_command, setup_logging

from .arguments import DataArguments, PretrainedModelArguments, SupervisedDataArguments
from .evaluation import EvaluationArguments, run_evaluation

ARGUMENT_TYPES = (DataArguments, SupervisedDataArguments, PretrainedModelArguments, EvaluationArguments)


def main(argv: list[str] | None = None) -> None:
    data_args, supervised_args, model_args, eval_args = parse_arguments(ARGUMENT_TYPES, argv, description=__doc__)
    setup_logging()
    run_command("barlow-eval", lambda: run_evaluation(data_args, supervised_args, model_args, eval_args))


if __name__ == "__main__":
    main()
