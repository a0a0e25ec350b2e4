"""End-to-end run of the model on real images that ship with scikit-learn (no downloads).

Builds a small Barlow Twins model, takes a few optimisation steps on two random crops of
scikit-learn's photos and digits, saves it, and reloads the encoder through the
image-feature-extraction pipeline.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_image
from torchvision.transforms import v2
from transformers import pipeline

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining, create_image_processor


def real_images() -> list[Image.Image]:
    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    digits = [Image.fromarray((d * 255 / 16).astype(np.uint8)).convert("RGB") for d in load_digits().images[:62]]
    return photos + digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="demo_output", help="where the model folder is saved")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BarlowTwinsConfig(
        backbone="resnet18", backbone_kwargs={"channels": [32, 64, 128, 256]},
        projector_dims=[512, 512], image_size=32, small_image_stem=True,
    )
    model = BarlowTwinsForPreTraining(config).train()
    crop = v2.Compose([
        v2.RandomResizedCrop(32, scale=(0.2, 1.0)), v2.RandomHorizontalFlip(), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(config.image_mean, config.image_std),
    ])
    images = real_images()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        view_1 = torch.stack([crop(image) for image in images])
        view_2 = torch.stack([crop(image) for image in images])
        out = model(view_1, view_2)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        print(f"step {step:2d}  loss {out.loss.item():8.2f}  on-diagonal {out.on_diagonal_loss.item():7.2f}"
              f"  off-diagonal {out.off_diagonal_loss.item():8.2f}")

    model.save_pretrained(args.output_dir)
    create_image_processor(config).save_pretrained(args.output_dir)
    extractor = pipeline("image-feature-extraction", model=args.output_dir)
    features = np.array(extractor(images[0], pool=True))
    print(f"saved to {args.output_dir}; pipeline features of china.jpg: shape {features.shape}")


if __name__ == "__main__":
    main()
