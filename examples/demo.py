"""The main job end to end on the embedded default data (scikit-learn's handwritten digits).

1. Pretrain a small ResNet-18 with Barlow Twins (barlow-pretrain, the same code as the CLI).
2. Compare its features with those of the same network randomly initialised: kNN and a linear
   probe on the digits' held-out split, so you can see that it learned.
3. Load the saved folder in transformers' image-feature-extraction pipeline.

Runs offline on a CPU in a few minutes: `make demo`, or `python examples/demo.py --help`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from transformers import pipeline

from modeling_barlow import BarlowTwinsForPreTraining, BarlowTwinsModel
from training.evaluation.features import extract_features, knn_top1
from training.evaluation.probes import exact_linear_probe
from training.pretrain import main as pretrain
from training.pretraining.monitor import labelled_loaders
from training.shared.metrics import topk_accuracy


def evaluate(encoder: torch.nn.Module, config) -> tuple[float, float]:
    """(kNN top-1, linear-probe top-1) of `encoder`'s features on the digits' held-out split."""
    train_loader, test_loader = labelled_loaders("default", config)
    train = extract_features(encoder, train_loader)
    test = extract_features(encoder, test_loader)
    linear = topk_accuracy(exact_linear_probe(*train, test[0], num_classes=10), test[1])["top1"]
    return knn_top1(*train, *test, k=20, temperature=0.1), linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="where the pretrained model is saved")
    parser.add_argument("--num_train_epochs", default="12", help="pretraining epochs over the 1438 training digits")
    args = parser.parse_args()

    print("1/3 Pretraining ResNet-18 (16-32-64-128 channels, 32 px stem) with Barlow Twins on the digits")
    pretrain([
        "--output_dir", args.output_dir, "--backbone", "resnet18",
        "--backbone_kwargs", '{"channels": [16, 32, 64, 128]}', "--small_image_stem", "--image_size", "32",
        "--projector_dims", "1024", "1024", "1024", "--per_device_train_batch_size", "128",
        "--num_train_epochs", args.num_train_epochs, "--warmup_epochs", "1", "--logging_steps", "11",
        "--overwrite_output_dir",  # the demo replaces its earlier run
    ])

    print("\n2/3 Evaluating features on the held-out digits (kNN k=20 cosine; logistic-regression probe)")
    trained = BarlowTwinsForPreTraining.from_pretrained(args.output_dir)
    torch.manual_seed(0)
    random_init = BarlowTwinsModel(trained.config)
    rows = [
        ("random init", *evaluate(random_init, trained.config)),
        ("Barlow Twins", *evaluate(trained.barlow_twins, trained.config)),
    ]
    print(f"{'encoder':<14} {'kNN top-1':>10} {'linear top-1':>13}")
    for name, knn, linear in rows:
        print(f"{name:<14} {knn:>10.3f} {linear:>13.3f}")

    print("\n3/3 Feature extraction with the transformers pipeline from the saved folder")
    extractor = pipeline("image-feature-extraction", model=args.output_dir)
    photo = Image.fromarray(load_sample_image("china.jpg"))
    features = np.array(extractor(photo, pool=True))
    print(f"pipeline('image-feature-extraction', model='{args.output_dir}')(china.jpg, pool=True): shape {features.shape}")
    print(f"\nSaved in {Path(args.output_dir).resolve()}: the model, cross_correlation.png, metrics.json, log_history.jsonl")


if __name__ == "__main__":
    main()
