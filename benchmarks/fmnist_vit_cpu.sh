#!/usr/bin/env bash
# Does a Vision Transformer learn here, and does LARS collapse it? Fashion-MNIST on the CPU, with the
# budget of the ResNet recipe comparison (benchmarks/fmnist_recipes_cpu.sh). The result is
# benchmarks/results/fmnist_vit.json; benchmarks/RESULTS.md discusses it.
#
#   python -c 'import sys; sys.path.insert(0, "benchmarks"); from fashion_mnist import *; convert(IDX_DIR, Path(sys.argv[1]))' PARQUET_DIR
#   bash benchmarks/fmnist_vit_cpu.sh PARQUET_DIR [WORK_DIR] [RECIPE ...]
#
# SEED (default 42) seeds initialisation, augmentation and the evaluation; RESULTS (default
# benchmarks/results/fmnist_vit.json) is the JSON written; THREADS (default 1) is each pretraining
# run's thread count (2 for one recipe alone on a 2-core machine); EVAL_THREADS (default 1) each
# evaluation's.
#
# Every recipe gets the same run: ViT-Tiny (12 blocks of width 192, 3 heads) with 4 px patches at
# 32 px (benchmarks/configs/vit_adamw.yaml; class-token pooling unless the recipe says otherwise),
# projector 2048-2048-2048 (unless the recipe says otherwise), batch 256, the first 10,000 training
# images for 20 epochs (780 steps, 2 warm-up epochs), no blur, bf16 autocast (the loss stays fp32),
# seed $SEED, RankMe of 256 test images every 39 steps. Then barlow-eval (fp32) on the full splits:
# linear probe (SGD on frozen features) and kNN (k 20). The recipes run at once, THREADS threads each;
# each evaluation has EVAL_THREADS. Then the first recipe's architecture (its pooling too) randomly
# initialised, in random-eval-<that recipe>, so a work folder shared by recipes with different
# pooling never reuses another's baseline.
# A run that stops can be restarted with the same command: pretraining resumes from its latest
# checkpoint (every 78 steps), and finished steps are skipped.
#
# Recipes (barlow-pretrain options on top of the shared ones):
#   adamw  benchmarks/configs/vit_adamw.yaml: AdamW, 5e-4 per 256 images, weight decay 0.05
#   adamw_avg  the same with the mean of the patch tokens as the feature (timm's global_pool "avg")
#          and twice the learning rate, 1e-3 per 256 images
#   adamw_crop  class token as in adamw, with milder crops (area 0.2-1, SimSiam's CIFAR and MoCo v2's
#          value: at 32 px a 0.08 crop of a 28 px garment is a 9 px patch of it) and 1e-3 per 256 images
#   adamw_proj1024  adamw (class token, 5e-4, crops 0.08-1) with a smaller projector, 1024-1024-1024,
#          for the 192-wide encoder
#   lars   the same network with the LARS settings that did best for the ResNet on this data
#          (configs/fmnist_small_image.yaml: weights 6.0, biases 0.3, weight decay 1e-4, loss scale 0.1)
set -u
DATA=$(realpath "${1:?the Fashion-MNIST parquet folder (benchmarks/fashion_mnist.py writes one)}")
WORK=$(realpath -m "${2:-runs/fmnist_vit}")
shift $(( $# < 2 ? $# : 2 ))
if [ $# -gt 0 ]; then RECIPES=("$@"); else RECIPES=(adamw lars); fi
SEED=${SEED:-42}
THREADS=${THREADS:-1}
EVAL_THREADS=${EVAL_THREADS:-1}
RESULTS=$(realpath -m "${RESULTS:-$(dirname "$0")/results/fmnist_vit.json}")
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
mkdir -p "$WORK"

recipe_options() {
  case $1 in
    adamw) echo "--config benchmarks/configs/vit_adamw.yaml" ;;
    adamw_avg) echo "--config benchmarks/configs/vit_adamw.yaml --backbone_kwargs {\"patch_size\":4,\"global_pool\":\"avg\"}" \
                    "--learning_rate_weights 1e-3 --learning_rate_biases 1e-3" ;;
    adamw_crop) echo "--config benchmarks/configs/vit_adamw.yaml --min_crop_scale 0.2" \
                     "--learning_rate_weights 1e-3 --learning_rate_biases 1e-3" ;;
    adamw_proj1024) echo "--config benchmarks/configs/vit_adamw.yaml --projector_dims 1024 1024 1024" ;;
    lars) echo "--config benchmarks/configs/vit_adamw.yaml --optimizer lars --learning_rate_weights 6.0" \
               "--learning_rate_biases 0.3 --weight_decay 1e-4 --loss_scale 0.1" ;;
    *) echo "unknown recipe $1" >&2; return 1 ;;
  esac
}

evaluate() {  # evaluate MODEL_DIR OUT_DIR THREADS [barlow-eval options]
  local model=$1 out=$2 threads=$3
  shift 3
  [ -f "$out/eval_results.json" ] && return 0
  OMP_NUM_THREADS=$threads HF_HUB_OFFLINE=1 "$PYTHON" -m training.evaluate --dataset_name "$DATA" --no_streaming \
    --eval_split test --model_name_or_path "$model" --output_dir "$out" --protocol knn linear \
    --knn_k 20 --dataloader_num_workers 1 --seed "$SEED" "$@"
}

run_recipe() {
  local name=$1 options resume=()
  options=$(recipe_options "$name") || return 1
  if [ ! -f "$WORK/$name/metrics.json" ]; then
    compgen -G "$WORK/$name/checkpoint-*" > /dev/null && resume=(--resume_from_checkpoint latest)
    # shellcheck disable=SC2086  # options is a list of words
    OMP_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 "$PYTHON" -m training.pretrain --dataset_name "$DATA" --no_streaming \
      --output_dir "$WORK/$name" --projector_dims 2048 2048 2048 --per_device_train_batch_size 256 \
      --max_train_samples 10000 --num_train_epochs 20 --warmup_epochs 2 --logging_steps 39 \
      --blur_probability 0 0 --dataloader_num_workers 1 --mixed_precision bf16 --checkpointing_steps 78 \
      --seed "$SEED" $options "${resume[@]}" >> "$WORK/$name.pretrain.log" 2>&1 || { echo "$name: pretraining failed"; return 1; }
  fi
  evaluate "$WORK/$name" "$WORK/$name-eval" "$EVAL_THREADS" > "$WORK/$name.eval.log" 2>&1
  echo "$name: exit $?"
}

# The machine may be shared: its load average every 5 minutes goes into the results.
( while true; do echo "$(date +%s) $(cut -d' ' -f1 /proc/loadavg)" >> "$WORK/loadavg.log"; sleep 300; done ) &
SAMPLER=$!
PIDS=()
for name in "${RECIPES[@]}"; do run_recipe "$name" & PIDS+=($!); done
wait "${PIDS[@]}"

# For reference: the same architecture with no pretraining.
evaluate "$WORK/${RECIPES[0]}" "$WORK/random-eval-${RECIPES[0]}" 2 --random_init > "$WORK/random.eval.log" 2>&1
kill "$SAMPLER"

"$PYTHON" - "$DATA" "$WORK" "$SEED" "$RESULTS" "${RECIPES[@]}" <<'EOF'
import json, sys, time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from common import machine, versions

data, work, seed, out, recipes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:]
record = {"setting": "ViT-Tiny (depth 12, width 192, 3 heads) with patch 4 at 32 px, pooling as each recipe's "
                     "backbone_kwargs say (the random init: the first recipe's), "
                     "projector 2048-2048-2048 unless a recipe's projector_dims say otherwise, batch 256, 10,000 training images x 20 epochs (780 steps, 2 warm-up "
                     f"epochs), crops of area 0.08-1 unless a recipe's min_crop_scale says otherwise, no blur, bf16 autocast, seed {seed}; evaluation in fp32 on all 60,000 / 10,000 "
                     "images: linear probe (SGD, 100 epochs) and kNN (k 20, T 0.1). RankMe (Garrido et al. 2023) of "
                     "the encoder's features and of the projections of the first 256 test images, every 39 steps.",
          "machine": machine(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "seed": seed,
          "command": f"SEED={seed} RESULTS={out} bash benchmarks/fmnist_vit_cpu.sh {data} {work} " + " ".join(recipes),
          "recipes": {}}
for name in recipes:
    try:
        results = json.loads((work / f"{name}-eval" / "eval_results.json").read_text())
        args = json.loads((work / name / "training_args.json").read_text())
        metrics = json.loads((work / name / "metrics.json").read_text())
        history = [json.loads(line) for line in (work / name / "log_history.jsonl").read_text().splitlines()]
    except (OSError, ValueError) as error:
        record["recipes"][name] = {"error": str(error)}
        continue
    keys = ("optimizer", "learning_rate_weights", "learning_rate_biases", "weight_decay", "loss_scale",
            "backbone", "backbone_kwargs", "image_size", "min_crop_scale", "projector_dims", "mixed_precision")
    record["recipes"][name] = {
        "linear_top1": results["linear_top1"], "knn_top1": results["knn_top1"],
        "rankme": [{"step": h["step"], "rankme": h.get("rankme"), "rankme_projections": h.get("rankme_projections"),
                    "train_loss": h.get("train_loss")} for h in history],
        "final_rankme": metrics.get("rankme"), "final_on_diagonal_loss": metrics.get("on_diagonal_loss"),
        "pretrain_wall_time_s": metrics.get("total_wall_time_s"), "options": {k: args.get(k) for k in keys}}
try:
    random_init = json.loads((work / f"random-eval-{recipes[0]}" / "eval_results.json").read_text())
    record["random_init_linear_top1"] = random_init["linear_top1"]
    record["random_init_knn_top1"] = random_init["knn_top1"]
except (OSError, ValueError) as error:
    record["random_init_error"] = str(error)
# Where the trajectories start: RankMe of the same network newly initialised with the seed, measured
# as the runs measure it (the first 256 test images, eval mode, bf16 autocast).
try:
    from types import SimpleNamespace

    import torch
    from accelerate import Accelerator
    from modeling_barlow import BarlowTwinsConfig, BarlowTwinsForPreTraining
    from training.pretraining.collapse import RankMeMonitor
    from training.shared.data import load_image_dataset, resolve_image_column

    config = BarlowTwinsConfig.from_pretrained(work / recipes[0])
    torch.manual_seed(seed)
    data_args = SimpleNamespace(dataset_name=data, train_dir=None, dataset_config_name=None, cache_dir=None,
                                train_split="train")
    image_column = resolve_image_column(load_image_dataset(data, split="test", streaming=True))
    monitor = RankMeMonitor.create(data_args, image_column, config, Accelerator(cpu=True, mixed_precision="bf16"), 256, 0.0)
    record["random_init_rankme"] = monitor.measure(BarlowTwinsForPreTraining(config), step=0)
except (OSError, ValueError) as error:
    record["random_init_rankme"] = {"error": str(error)}
# The issue's keys at the top level: the AdamW recipe's, LARS's beside them for contrast.
for name, prefix in (("adamw", ""), ("lars", "lars_")):
    result = record["recipes"].get(name, {})
    if "linear_top1" in result:
        record[f"{prefix}linear_top1"] = result["linear_top1"]
        record[f"{prefix}knn_top1"] = result["knn_top1"]
        record[f"{prefix}rankme_trajectory"] = [[h["step"], h["rankme"]] for h in result["rankme"]]
flags = Path("/proc/cpuinfo").read_text().split()
record["machine"]["cpu_flags"] = {flag: flag in flags for flag in ("avx512_bf16", "amx_bf16", "amx_tile")}
try:
    loads = sorted(float(line.split()[1]) for line in (work / "loadavg.log").read_text().splitlines())
    record["machine"]["load_average_during_runs"] = {"median": loads[len(loads) // 2], "max": loads[-1], "samples": len(loads)}
except (OSError, ValueError, IndexError):
    pass
out.write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps(record, indent=2))
EOF
