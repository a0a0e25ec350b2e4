"""Fine-tune a pretrained encoder as an image classifier, with Accelerate.

    barlow-finetune --model_name_or_path out --output_dir clf        # scikit-learn's digits, offline
    accelerate launch --quiet -m training.finetune --model_name_or_path out --dataset_name <id or folder> --output_dir clf

The model is `BarlowTwinsForImageClassification` for a Barlow Twins folder (pretraining, encoder
or classifier), or whatever `AutoModelForImageClassification` loads. Training images get random
resized crops and flips; every epoch ends with top-1 (and top-5) on the held-out split. The output
folder loads in transformers' `image-classification` pipeline, with the dataset's class names in
`id2label`.

Writes the classifier, its image processor, metrics.json and log_history.jsonl into
--output_dir. Exit status: 0 done, 1 failed, 2 an option or input to change.
"""

from __future__ import annotations

from barlow_cli import parse_arguments, run_command, setup_logging

from .arguments import DataArguments, HubArguments, PretrainedModelArguments, SupervisedDataArguments
from .finetuning import DENSE_TASKS, FinetuningArguments, requested_task, run_finetuning

ARGUMENT_TYPES = (DataArguments, SupervisedDataArguments, PretrainedModelArguments, FinetuningArguments, HubArguments)


def main(argv: list[str] | None = None) -> None:
    if requested_task(argv) in DENSE_TASKS:  # detection and segmentation: their own script
        from .finetuning.dense.finetune import main as finetune_dense

        return finetune_dense(argv)
    data_args, supervised_args, model_args, train_args, hub_args = parse_arguments(
        ARGUMENT_TYPES, argv, description=__doc__
    )
    setup_logging()
    run_command("barlow-finetune", lambda: run_finetuning(data_args, supervised_args, model_args, train_args, hub_args))


if __name__ == "__main__":
    main()
