"""What every benchmark shares: alternating timing, peak memory, machine facts and the result file.

Each benchmark under benchmarks/ is one command that ends with :func:`write_result`, which writes
``benchmarks/results/<name>.json`` with the keys RESULTS.md shows: ``ours``, ``baseline``,
``ratio`` (> 1 means ours is better, whichever way the unit points), ``unit``,
``higher_is_better``, ``machine``, ``versions``, ``date``, ``command`` and, where memory was
measured, ``memory_ratio`` (ours' peak over the baseline's; < 1 means ours uses less).

Time: contenders alternate within one process (A B A B ... with the order flipped every round)
so that load from other work on a shared machine falls on both, and medians are reported.

Memory on the CPU: each contender runs in its own process; the peak is the resident set's
high-water mark above the resident set right after its imports (tracemalloc does not see torch's
allocator), over a workload that builds what it needs and runs. ``/proc/self/clear_refs`` resets
the mark, so the imports' own peaks are excluded. The workers run with a fixed glibc mmap
threshold (:data:`MEMORY_WORKER_ENV`) so that freed tensors leave the resident set.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

_PACKAGES = ("torch", "torchvision", "timm", "transformers", "accelerate", "datasets", "numpy", "pillow", "lightly")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that matter to the numbers."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> dict:
    """The CPU model as lscpu names it, and whether it has the instructions that make bf16 fast:
    AVX512-BF16 (bf16 dot products) and AMX (bf16 tile multiplies)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {
        "lscpu_model_name": fields.get("Model name", "").strip() or None,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_tile": "amx_tile" in flags,
    }


def machine() -> dict:
    """The CPU (with its bf16 flags), its cores, torch's threads, the load average, and the GPU if
    there is one."""
    import torch

    info = {
        "cpu": _cpu_model(),
        **cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def command() -> str:
    """The command line that produced this run, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def alternate(contenders: dict[str, Callable[[], float]], runs: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Call each contender ``warmup`` times, then ``runs`` times each, alternating and flipping the order.

    Each callable returns one measurement (seconds, or any number); the lists come back in call order.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for index in range(runs):
        for name in names if index % 2 == 0 else reversed(names):
            samples[name].append(contenders[name]())
    return samples


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds that ``fn()`` took; ``sync`` (e.g. torch.cuda.synchronize) runs before both clock reads."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """This process's resident set now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (since start or the last :func:`reset_peak_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the high-water mark to the current resident set (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_peak_above_start(workload: Callable[[], object]) -> int:
    """Bytes the resident set peaked above where it stood before ``workload`` (call it right after
    the imports, with the set-up inside ``workload``)."""
    reset_peak_rss()
    start = rss_bytes()
    workload()
    return peak_rss_bytes() - start


# glibc returns a freed block to the system only if it was mmap-ed, and by default it raises its
# mmap threshold (up to 32 MiB) each time such a block is freed; blocks below it stay in the heap
# once freed, and the resident set then shows the allocator's history rather than what is alive
# (the loss at D 2048, N 4096, whose tensors are exactly 32 MiB, read 268 or 352 MB by chance).
# A fixed 1 MiB threshold makes every large tensor mmap-ed, so the peak follows live memory.
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_memory_worker(script: Path | str, args: list[str], timeout: float = 1800) -> dict:
    """Run ``python script *args`` in a fresh process (with :data:`MEMORY_WORKER_ENV`); it must print
    one JSON object as its last line."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath, **MEMORY_WORKER_ENV},
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory worker {script} {args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- result
def write_result(
    name: str,
    *,
    ours: float,
    baseline: float,
    unit: str,
    higher_is_better: bool,
    memory_ratio: float | None = None,
    target: str | None = None,
    details: dict | None = None,
    extra: dict | None = None,
    results_dir: Path = RESULTS_DIR,
) -> Path:
    """Write ``results_dir/<name>.json`` and print it; ``ratio`` > 1 always means ours is better.
    ``extra`` holds further top-level keys (a benchmark's own headline numbers)."""
    ratio = ours / baseline if higher_is_better else baseline / ours
    record = {
        "name": name,
        "ours": ours,
        "baseline": baseline,
        "ratio": round(ratio, 4),
        "unit": unit,
        "higher_is_better": higher_is_better,
        **({"memory_ratio": round(memory_ratio, 4)} if memory_ratio is not None else {}),
        **({"target": target} if target else {}),
        **(extra or {}),
        "machine": machine(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command(),
        **({"details": details} if details else {}),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"Wrote {path}")
    return path


def write_not_measured(name: str, reason: str, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results_dir/<name>.json`` saying why nothing was measured, with the machine and command."""
    record = {"name": name, "not_measured": reason, "machine": machine(), "versions": versions(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command()}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{reason}; wrote {path}")
    return path


# --------------------------------------------------------------------------------------------- data
def photo_crops(count: int, short_side: int = 256, seed: int = 0) -> list:
    """``count`` PIL RGB crops of scikit-learn's sample photos (china.jpg, flower.jpg; 427x640):
    random position, area 25-100% of the largest crop of a random aspect ratio in [3/4, 4/3],
    random flip, resized (bicubic) so that the short side is ``short_side``. Real photographs of
    ImageNet-like size, made offline."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))  # width / height
        height = min(photo.height, photo.width / aspect) * np.sqrt(rng.uniform(0.25, 1.0))
        width, height = round(height * aspect), round(height)
        left, top = int(rng.integers(photo.width - width + 1)), int(rng.integers(photo.height - height + 1))
        crop = photo.crop((left, top, left + width, top + height))
        scale = short_side / min(crop.size)
        crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crops.append(crop)
    return crops


def _jpeg_rows(count: int, short_side: int, seed: int, quality: int) -> list[dict]:
    import io

    rows = []
    for crop in photo_crops(count, short_side, seed):
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=quality)
        rows.append({"bytes": buffer.getvalue(), "path": None})
    return rows


def make_photo_parquet(
    out_dir: Path, count: int, short_side: int = 256, shards: int = 8, seed: int = 0, quality: int = 90,
    processes: int = 1,
) -> Path:
    """:func:`photo_crops` as JPEG bytes in parquet shards ``train-0000i.parquet`` that
    ``load_dataset(out_dir)`` reads; written once and reused.

    With ``processes`` > 1 each shard is cut in its own process from its own seed (faster; other
    crops, same distribution); with 1, all come from ``seed`` in one sequence.
    """
    import concurrent.futures
    import multiprocessing

    import datasets

    out_dir = Path(out_dir)
    if len(list(out_dir.glob("train-*.parquet"))) == shards:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image()})
    if processes == 1:
        table = datasets.Dataset.from_dict({"image": _jpeg_rows(count, short_side, seed, quality)}, features=features)
        parts = [table.shard(shards, index) for index in range(shards)]
    else:
        sizes = [count // shards + (index < count % shards) for index in range(shards)]
        seeds = [seed * 1000 + index for index in range(shards)]
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(shards, processes), mp_context=context) as pool:
            rows = pool.map(_jpeg_rows, sizes, [short_side] * shards, seeds, [quality] * shards)
            parts = [datasets.Dataset.from_dict({"image": part}, features=features) for part in rows]
    for index, part in enumerate(parts):
        part.to_parquet(str(out_dir / f"train-{index:05d}.parquet"))
    return out_dir
