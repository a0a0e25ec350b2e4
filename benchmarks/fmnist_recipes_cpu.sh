#!/usr/bin/env bash
# Which pretraining optimiser settings learn fastest on Fashion-MNIST? A CPU comparison at a small
# scale, to choose the settings of the full GPU run (benchmarks/fashion_mnist.py). The result is
# benchmarks/results/fmnist_recipes.json; benchmarks/RESULTS.md discusses it.
#
#   bash benchmarks/fmnist_recipes_cpu.sh PARQUET_DIR [WORK_DIR] [RECIPE ...]
#   SEED=43 RESULTS=benchmarks/results/fmnist_recipes_seed43.json bash benchmarks/fmnist_recipes_cpu.sh ...
#
# SEED (default 42) seeds initialisation, augmentation and the evaluation; RESULTS (default
# benchmarks/results/fmnist_recipes.json) is the JSON written, so a second seed keeps the first.
#
# Every recipe gets the same run: ResNet-18 at a quarter width (channels 16-32-64-128) with the
# small-image stem at 32 px, projector 2048-2048-2048, batch 256, the first 10,000 training
# images for 20 epochs (780 steps, 2 warm-up epochs), no blur, seed $SEED. Then barlow-eval on the
# full splits: linear probe (SGD on frozen features) and kNN (k 20). Two recipes run at a time
# with one thread each, about 80 minutes per pair on the 2-core development machine; then a
# linear probe and kNN of the same architecture randomly initialised, for reference.
#
# Recipes (barlow-pretrain options on top of the shared ones):
#   paper        the paper's optimiser: LARS eta 0.001, lr 0.2 / 0.0048 per 256, weight decay 1.5e-6
#   small_image  benchmarks/configs/fmnist_small_image.yaml
#   solo_clip    solo-learn's CIFAR-10 recipe written out: LARS eta 0.02 with LARC's clip, lr 0.3
#                for weights and biases, weight decay 1e-4, loss scale 0.1
set -u
DATA=$(realpath "${1:?the Fashion-MNIST parquet folder (benchmarks/fashion_mnist.py writes one)}")
WORK=$(realpath -m "${2:-runs/fmnist_recipes}")
shift $(( $# < 2 ? $# : 2 ))
if [ $# -gt 0 ]; then RECIPES=("$@"); else RECIPES=(paper small_image solo_clip); fi
SEED=${SEED:-42}
RESULTS=$(realpath -m "${RESULTS:-$(dirname "$0")/results/fmnist_recipes.json}")
cd "$(dirname "$0")/.."
# The project's environment (make test creates .venv), unless PYTHON says otherwise.
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
mkdir -p "$WORK"

recipe_options() {
  case $1 in
    paper) ;;
    small_image) echo "--config benchmarks/configs/fmnist_small_image.yaml" ;;
    solo_clip) echo "--learning_rate_weights 0.3 --learning_rate_biases 0.3 --lars_trust_coefficient 0.02" \
                    "--lars_trust_clip --weight_decay 1e-4 --loss_scale 0.1" ;;
    *) echo "unknown recipe $1" >&2; return 1 ;;
  esac
}

run_recipe() {
  local name=$1 options
  options=$(recipe_options "$name") || return 1
  # shellcheck disable=SC2086  # options is a list of words
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PYTHON" -m training.pretrain --dataset_name "$DATA" --no_streaming \
    --output_dir "$WORK/$name" --backbone resnet18 --backbone_kwargs '{"channels": [16, 32, 64, 128]}' \
    --small_image_stem --image_size 32 --projector_dims 2048 2048 2048 --per_device_train_batch_size 256 \
    --max_train_samples 10000 --num_train_epochs 20 --warmup_epochs 2 --logging_steps 39 \
    --blur_probability 0 0 --dataloader_num_workers 1 --seed "$SEED" $options > "$WORK/$name.pretrain.log" 2>&1 &&
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PYTHON" -m training.evaluate --dataset_name "$DATA" --no_streaming \
    --eval_split test --model_name_or_path "$WORK/$name" --output_dir "$WORK/$name-eval" --protocol knn linear \
    --knn_k 20 --dataloader_num_workers 1 --seed "$SEED" > "$WORK/$name.eval.log" 2>&1
  echo "$name: exit $?"
}

# Two at a time: the machine has two cores.
for ((i = 0; i < ${#RECIPES[@]}; i += 2)); do
  run_recipe "${RECIPES[i]}" &
  [ $((i + 1)) -lt ${#RECIPES[@]} ] && run_recipe "${RECIPES[i + 1]}" &
  wait
done

# For reference: the same architecture with no pretraining.
OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 "$PYTHON" -m training.evaluate --dataset_name "$DATA" --no_streaming \
  --eval_split test --model_name_or_path "$WORK/${RECIPES[0]}" --random_init --output_dir "$WORK/random-eval" \
  --protocol knn linear --knn_k 20 --dataloader_num_workers 1 --seed "$SEED" > "$WORK/random.eval.log" 2>&1

"$PYTHON" - "$DATA" "$WORK" "$SEED" "$RESULTS" "${RECIPES[@]}" <<'EOF'
import json, sys, time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, "benchmarks")
from common import machine, versions
from training.arguments import ModelArguments, PretrainingArguments

# Runs made before an option existed used its default, which was then fixed in the code.
defaults = {f.name: f.default for cls in (ModelArguments, PretrainingArguments) for f in fields(cls)}

data, work, seed, out, recipes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:]
record = {"setting": "ResNet-18 channels 16-32-64-128, small-image stem, 32 px, projector 2048-2048-2048, "
                     f"batch 256, 10,000 training images x 20 epochs (780 steps), no blur, seed {seed}; "
                     "evaluation on all 60,000 / 10,000 images: linear probe (SGD, 100 epochs) and kNN (k 20, T 0.1)",
          "machine": machine(), "versions": versions(),
          "date": time.strftime("%Y-%m-%d"), "seed": seed,
          "command": f"SEED={seed} RESULTS={out} bash benchmarks/fmnist_recipes_cpu.sh {data} {work} " + " ".join(recipes),
          "recipes": {}}
for name in recipes:
    try:
        results = json.loads((work / f"{name}-eval" / "eval_results.json").read_text())
        args = json.loads((work / name / "training_args.json").read_text())
        metrics = json.loads((work / name / "metrics.json").read_text())
    except (OSError, ValueError) as error:
        record["recipes"][name] = {"error": str(error)}
        continue
    keys = ("learning_rate_weights", "learning_rate_biases", "weight_decay", "loss_scale",
            "lars_trust_coefficient", "lars_trust_clip")
    record["recipes"][name] = {"linear_top1": results["linear_top1"], "knn_top1": results["knn_top1"],
                               "final_on_diagonal_loss": metrics.get("on_diagonal_loss"),
                               "pretrain_wall_time_s": metrics.get("wall_time_s"),
                               "options": {k: args.get(k, defaults[k]) for k in keys}}
try:
    random_init = json.loads((work / "random-eval" / "eval_results.json").read_text())
    record["random_init"] = {"linear_top1": random_init["linear_top1"], "knn_top1": random_init["knn_top1"]}
except (OSError, ValueError) as error:
    record["random_init"] = {"error": str(error)}
out.write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps(record, indent=2))
EOF
