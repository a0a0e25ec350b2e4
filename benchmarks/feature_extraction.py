"""Feature extraction throughput: the transformers pipeline on a saved model against raw timm.

    python benchmarks/feature_extraction.py                 # model folder under /tmp/barlow_bench_features

* ours: ``transformers.pipeline("image-feature-extraction", model=<folder>)`` on a saved
  ``BarlowTwinsModel`` (timm ResNet-18, 224 px, random weights) and its image processor
  (``create_image_processor``), called on a list of PIL images with ``batch_size`` and
  ``pool=True``: the pooled embeddings as lists, as a user gets them.
* baseline: ``timm.create_model("resnet18", num_classes=0)`` with the same weights, timm's own
  evaluation transform from its data config (resize the short side to 235 bicubic, centre-crop
  224, normalise: the processor's parameters), ``torch.stack`` per batch, forward under
  ``torch.inference_mode()``: pooled embeddings as tensors.

Both get the same list of images: crops of scikit-learn's sample photos with the short side at
256 px (``benchmarks/common.py``'s ``photo_crops``). images/s, medians of alternating runs.
``details.preprocessing`` times the two preprocessing paths alone (images/s) the same way, to show
where the time goes. Writes benchmarks/results/feature_extraction.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from common import REPO_ROOT, alternate, median, timed, write_result

sys.path.insert(0, str(REPO_ROOT))

from common import photo_crops

from modeling_barlow import BarlowTwinsConfig, BarlowTwinsModel, create_image_processor

DEFAULT_WORK_DIR = Path("/tmp/barlow_bench_features")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="alternating timed runs per contender (>= 5)")
    args = parser.parse_args()

    import timm
    from timm.data import create_transform, resolve_data_config
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("timm").setLevel(logging.WARNING)
    torch.manual_seed(0)
    config = BarlowTwinsConfig(backbone="resnet18", projector_dims=[64], image_size=224)
    folder = args.work_dir / "barlow_resnet18"
    encoder = BarlowTwinsModel(config).eval()
    encoder.save_pretrained(folder)
    create_image_processor(config).save_pretrained(folder)

    extractor = pipeline("image-feature-extraction", model=str(folder), device="cpu")
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    backbone.load_state_dict(encoder.backbone.state_dict())
    backbone.eval()
    data_config = resolve_data_config({}, model=backbone)
    transform = create_transform(**data_config)
    images = photo_crops(args.images, short_side=256, seed=1)

    def ours() -> list:
        return extractor(images, batch_size=args.batch_size, pool=True)

    def baseline() -> list[torch.Tensor]:
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), args.batch_size):
                batch = torch.stack([transform(image) for image in images[start:start + args.batch_size]])
                out.append(backbone(batch))
        return out

    # Same features up to the preprocessing's 1 px crop offset (HF floors the margin, torchvision rounds it).
    ours_features = torch.tensor(ours()).reshape(len(images), -1)  # each result is [[512 floats]]
    base_features = torch.cat(baseline())
    cosine = torch.nn.functional.cosine_similarity(ours_features, base_features).min().item()
    processor = extractor.image_processor
    pixels_ours = processor(images[:16], return_tensors="pt")["pixel_values"]
    pixels_base = torch.stack([transform(image) for image in images[:16]])

    def rate(fn) -> float:
        return len(images) / timed(fn)

    samples = alternate({"ours": lambda: rate(ours), "baseline": lambda: rate(baseline)}, runs=args.runs, warmup=0)
    pre = alternate({
        "image_processor": lambda: rate(lambda: [processor(image, return_tensors="pt") for image in images]),
        "timm_transform": lambda: rate(lambda: [transform(image) for image in images]),
    }, runs=3, warmup=0)
    write_result(
        "feature_extraction",
        ours=round(median(samples["ours"]), 2),
        baseline=round(median(samples["baseline"]), 2),
        unit="images/s",
        higher_is_better=True,
        target="ratio >= 0.9",
        details={
            "ours": 'pipeline("image-feature-extraction", model=<saved BarlowTwinsModel>)'
                    f"(images, batch_size={args.batch_size}, pool=True)",
            "baseline": "timm resnet18 (same weights) + timm create_transform(**resolve_data_config(model)): "
                        f"{data_config}, "
                        f"batches of {args.batch_size}, torch.inference_mode()",
            "model": "timm resnet18, 224 px, num_features 512, random weights (speed does not depend on them)",
            "images": f"{args.images} PIL RGB crops of scikit-learn's sample photos, short side 256 px",
            "samples_images_per_s": {k: [round(v, 2) for v in vs] for k, vs in samples.items()},
            "preprocessing_images_per_s": {k: round(median(vs), 1) for k, vs in pre.items()},
            "preprocessing_samples": {k: [round(v, 1) for v in vs] for k, vs in pre.items()},
            "min_cosine_similarity_ours_vs_baseline": round(cosine, 4),
            "pixel_values_mean_abs_difference": round((pixels_ours - pixels_base).abs().mean().item(), 4),
            "preprocessing_note": (
                "same resize (short side 235, bicubic, PIL), crop 224 and normalisation; HF's centre crop floors "
                "an odd margin where torchvision rounds it, so the crops can sit 1 px apart (features close, not "
                "equal)"
            ),
            "torch_threads": torch.get_num_threads(),
            "note": "shared 2-core machine: another CPU job ran at the same time; ratios come from alternation",
        },
    )


if __name__ == "__main__":
    main()
