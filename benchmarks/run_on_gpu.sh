#!/usr/bin/env bash
# The GPU runs behind benchmarks/results/fashion_mnist.json and gpu_step.json, as they are run on a
# lent single-GPU machine (no network there: the Fashion-MNIST parquet shards travel with the
# repository, and the photos for the end-to-end run are cut from scikit-learn's samples).
#
#   OUT=/where/results/go bash benchmarks/run_on_gpu.sh PARQUET_DIR [FMNIST_SECONDS] [TOTAL_SECONDS]
#
# Fashion-MNIST gets FMNIST_SECONDS (420), the GPU step benchmark what is left of TOTAL_SECONDS (585).
# Environment:
#   PRETRAIN_SECONDS  pretraining's share of FMNIST_SECONDS (default 2/5 of it)
#   FMNIST_STEPS      fashion_mnist.py --steps (default: all). The results live in
#                     /tmp/fmnist/fashion_mnist.json between calls on the same (warm) machine, so
#                     a run can be split over two calls of one session, or its CPU-only step run
#                     elsewhere first and its record copied there (benchmarks/RESULTS.md), e.g.
#                       FMNIST_STEPS="pretrain evaluate random_init_linear supervised_scratch" \
#                         PRETRAIN_SECONDS=250 SKIP_GPU_STEP=1 ... 560 585
#   FMNIST_ARGS       more fashion_mnist.py options, e.g. the paper's optimiser settings instead of
#                     configs/fmnist_small_image.yaml (the default):  FMNIST_ARGS="--pretrain_config ''"
#   SKIP_GPU_STEP     set: Fashion-MNIST only
#
# The lent machines' image lacks timm and datasets: carry their wheels (.whl, see
# /work/.library/device/README.md) and install them first, e.g.
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Each run has a hard time limit; fashion_mnist.py rewrites its JSON after every step, so a run
# cut short still leaves what it finished.
set -u
DATA=${1:?the Fashion-MNIST parquet folder (benchmarks/fashion_mnist.py writes one)}
FMNIST_SECONDS=${2:-420}
TOTAL_SECONDS=${3:-585}
PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-$((FMNIST_SECONDS * 2 / 5))}
FMNIST_STEPS=${FMNIST_STEPS:-pretrain evaluate random_init_linear supervised_scratch raw_pixel_logreg}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" /tmp/fmnist
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf_home TOKENIZERS_PARALLELISM=false
# The repository itself, for a machine where it is not pip-installed (the lent GPU machines).
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
  "$PYTHON" -c "import sys, torch, torchvision, transformers, timm, accelerate, datasets, pyarrow
print(sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers',
      transformers.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'datasets',
      datasets.__version__, 'pyarrow', pyarrow.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# shellcheck disable=SC2086  # FMNIST_STEPS and FMNIST_ARGS are lists of words
timeout "$FMNIST_SECONDS" "$PYTHON" benchmarks/fashion_mnist.py --work_dir /tmp/fmnist --data_dir "$DATA" --gpu \
  --batch_size 512 --backbone_kwargs '{}' --pretrain_time_budget_s "$PRETRAIN_SECONDS" --steps $FMNIST_STEPS \
  ${FMNIST_ARGS:-} --results /tmp/fmnist/fashion_mnist.json > "$OUT/fashion_mnist.log" 2>&1
echo "fashion_mnist.py exit $? after ${SECONDS}s"
cp /tmp/fmnist/fashion_mnist.json "$OUT/"
# The pretrained encoder comes back too (bf16, in parts under the 16 MB a returned file may have):
#   cat encoder.tar.part-* | tar -x    gives encoder/, a folder that from_pretrained loads.
case " $FMNIST_STEPS " in *" pretrain "*)
"$PYTHON" -c "
import sys, torch
from modeling_barlow import BarlowTwinsModel, create_image_processor
model = BarlowTwinsModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model.save_pretrained('/tmp/encoder'); create_image_processor(model.config).save_pretrained('/tmp/encoder')
" /tmp/fmnist/pretrained && tar -cf - -C /tmp encoder | split -b 15M - "$OUT/encoder.tar.part-" ;;
esac
tail -c 1500 "$OUT/fashion_mnist.log"

if [ -n "${SKIP_GPU_STEP:-}" ]; then exit 0; fi

timeout $((TOTAL_SECONDS - SECONDS)) "$PYTHON" benchmarks/gpu_step.py --e2e_data /tmp/photos --out_dir "$OUT" \
  > "$OUT/gpu_step.log" 2>&1
echo "gpu_step.py exit $? after ${SECONDS}s"
tail -c 2500 "$OUT/gpu_step.log"
