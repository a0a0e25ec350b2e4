"""Barlow Twins pretraining with Accelerate, streaming images from `datasets`.

    accelerate launch -m training.pretrain --dataset_name <hub id or folder> --output_dir out
    barlow-pretrain --output_dir out            # scikit-learn's digits, offline

Two augmented views of each image go through the same network (a timm backbone, then the
projector); the loss pushes the cross-correlation matrix of their embeddings to the identity.
The output folder holds the model (`from_pretrained`, the feature-extraction pipeline), its image
processor, metrics.json, log_history.jsonl and a plot of C; checkpoints with
--checkpointing_steps. SIGTERM or Ctrl-C stops after the current step with a checkpoint, and
prints the command that resumes. Exit status: 0 done, 1 failed or stopped, 2 an option or input to change.
"""

from __future__ import annotations

import sys

from barlow_cli import parse_arguments, run_command, setup_logging

from .arguments import DataArguments, HubArguments, ModelArguments, OutputArguments, PretrainingArguments
from .pretraining import PROG, run_pretraining

ARGUMENT_TYPES = (DataArguments, ModelArguments, PretrainingArguments, OutputArguments, HubArguments)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    data_args, model_args, train_args, out_args, hub_args = parse_arguments(ARGUMENT_TYPES, argv, description=__doc__)
    setup_logging()
    run_command(PROG, lambda: run_pretraining(data_args, model_args, train_args, out_args, hub_args, argv))


if __name__ == "__main__":
    main()
