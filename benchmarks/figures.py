"""Draw the charts of RESULTS.md and the docs' results page from benchmarks/results/*.json.

    python benchmarks/figures.py            # writes benchmarks/results/*.png

Only numbers the JSON files hold are drawn; each chart's title names the file it comes from and the
machine it was measured on. The output is deterministic (Agg backend, fixed size and DPI, no
timestamp or software version in the PNG's metadata), so rerunning it on unchanged JSON changes no
file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


RESULTS = Path(__file__).resolve().parent / "results"
OURS, BASELINE, OTHER = "#1f77b4", "#ff7f0e", "#7f7f7f"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)


def _label_bars(axis: plt.Axes, bars, fmt: str) -> None:
    for bar in bars:
        axis.annotate(fmt.format(bar.get_height()), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")


def train_step_speed(output: Path) -> None:
    """Images/s of one training step on the CPU, ours against lightly, fp32 and bf16 (sections 1, 11, 16)."""
    fp32, bf16 = _load("train_step_cpu"), _load("train_step_cpu_bf16")
    groups = [
        ("fp32", fp32["details"]["images_per_s"], ["ours", "ours_eager", "baseline", "baseline_one_forward"]),
        ("bf16", bf16["details"]["images_per_s"], ["ours", "ours_eager", "baseline_bf16", "baseline_one_forward_bf16"]),
    ]
    names = ["ours (compiled)", "ours (eager)", "lightly", "lightly, one forward"]
    colours = [OURS, "#6baed6", BASELINE, "#fdae6b"]
    figure, axis = plt.subplots(figsize=(7, 3.6))
    width = 0.2
    for index, (name, colour) in enumerate(zip(names, colours)):
        heights = [values[keys[index]] for _, values, keys in groups]
        bars = axis.bar([g + (index - 1.5) * width for g in range(len(groups))], heights, width, label=name, color=colour)
        _label_bars(axis, bars, "{:.1f}")
    axis.set_xticks(range(len(groups)), [name for name, _, _ in groups])
    axis.set_ylabel("images/s (pairs of views), higher is better")
    details = fp32["details"]
    axis.set_title(f"Training step, ResNet-18 {details['image_size']} px, batch {details['batch_size_per_view']}, "
                   f"2-core {fp32['machine']['cpu']}\n(train_step_cpu.json, train_step_cpu_bf16.json)", fontsize=9)
    axis.legend(fontsize=8, loc="upper left")
    axis.set_ylim(0, max(bar.get_height() for bar in axis.patches) * 1.2)
    _save(figure, output / "train_step_speed.png")


def loss_speed(output: Path) -> None:
    """Seconds per forward and backward of the loss alone, ours against lightly's, per shape (section 2)."""
    data = _load("loss")
    shapes = data["details"]["shapes"]
    labels = [f"D {s['D']}, N {s['N']}\n({s['our_path']} path)" for s in shapes]
    figure, axis = plt.subplots(figsize=(7, 3.6))
    width = 0.38
    ours = axis.bar([i - width / 2 for i in range(len(shapes))], [s["ours_s"] for s in shapes], width, label="ours", color=OURS)
    base = axis.bar([i + width / 2 for i in range(len(shapes))], [s["baseline_s"] for s in shapes], width,
                    label="lightly", color=BASELINE)
    _label_bars(axis, ours, "{:.3g} s")
    _label_bars(axis, base, "{:.3g} s")
    axis.set_yscale("log")
    axis.set_xticks(range(len(shapes)), labels)
    axis.set_ylabel("seconds, forward + backward (log), lower is better")
    axis.set_ylim(top=max(s["baseline_s"] for s in shapes) * 4)
    axis.set_title(f"The Barlow Twins loss alone, median of {data['details']['runs']} runs, "
                   f"2-core {data['machine']['cpu']} (loss.json)", fontsize=9)
    axis.legend(fontsize=8)
    _save(figure, output / "loss_speed.png")


def fashion_mnist_accuracy(output: Path) -> None:
    """Top-1 on Fashion-MNIST's test set: the pretrained encoder's protocols and the references (issue #4)."""
    data = _load("fashion_mnist")
    rows = [
        ("Barlow Twins, linear probe", data["linear_top1"], OURS),
        ("Barlow Twins, kNN", data["knn_top1"], OURS),
        ("Barlow Twins, fine-tuned on 1% labels", data["semi_1pct_top1"], OURS),
        ("Barlow Twins, fine-tuned on 10% labels", data["semi_10pct_top1"], OURS),
        ("random weights, linear probe", data["random_init_linear_top1"], OTHER),
        ("raw pixels, logistic regression", data["raw_pixel_logreg_top1"], OTHER),
        ("supervised from scratch, all labels", data["supervised_scratch_top1"], BASELINE),
    ]
    figure, axis = plt.subplots(figsize=(7, 3.6))
    positions = list(range(len(rows)))[::-1]
    bars = axis.barh(positions, [value for _, value, _ in rows], color=[colour for _, _, colour in rows])
    for bar, (_, value, _) in zip(bars, rows):
        axis.annotate(f"{value:.3f}", (value, bar.get_y() + bar.get_height() / 2), va="center", fontsize=8,
                      xytext=(3, 0), textcoords="offset points")
    axis.set_yticks(positions, [name for name, _, _ in rows], fontsize=8)
    axis.set_xlim(0, 1.08)
    axis.set_xlabel("top-1 accuracy on the test set")
    axis.set_title(f"Fashion-MNIST, ResNet-18 at 32 px pretrained {data['epochs']} epochs on one H100\n"
                   "(fashion_mnist.json)", fontsize=9)
    _save(figure, output / "fashion_mnist_accuracy.png")


def dense_transfer(output: Path) -> None:
    """Held-out mIoU and mAP per epoch, fine-tuned from the encoder and from random weights (section 12)."""
    data = _load("dense_transfer")
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for axis, (task, label) in zip(axes, [("segmentation", "UperNet, mIoU"), ("detection", "DETR, mAP")]):
        result = data["tasks"][task]
        for key, name, colour in [("barlow", "from the Barlow Twins encoder", OURS), ("random", "from random weights", OTHER)]:
            history = result[f"{key}_history"]
            axis.plot(range(1, len(history) + 1), history, label=f"{name} (last {history[-1]:.3f})", color=colour)
        axis.set_xlabel("epoch")
        axis.set_ylabel(label.split(", ")[1] + " on held-out scenes")
        axis.set_title(label, fontsize=9)
        axis.legend(fontsize=7)
    figure.suptitle("Transfer to dense tasks, same budget for both starts (dense_transfer.json)", fontsize=9)
    _save(figure, output / "dense_transfer.png")


FIGURES = [train_step_speed, loss_speed, fashion_mnist_accuracy, dense_transfer]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=RESULTS, help="where the PNGs go (default: benchmarks/results)")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    plt.rcParams.update({"font.size": 9})
    for figure in FIGURES:
        figure(args.output_dir)
        print(args.output_dir / f"{figure.__name__}.png")


if __name__ == "__main__":
    main()
