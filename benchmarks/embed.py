"""barlow-embed and barlow-search on Fashion-MNIST: speed, memory, search latency and retrieval quality.

    python benchmarks/embed.py --model_dir PRETRAINED --data_dir FMNIST_PARQUET --work_dir /tmp/embed_bench

PRETRAINED is a barlow-pretrain output folder; FMNIST_PARQUET the parquet shards that
benchmarks/fashion_mnist.py makes from the IDX files (made here under --work_dir if not given).
Writes benchmarks/results/embed.json:

* ``ratio``: barlow-embed's images/s over the parquet shards (reading, decoding, the image
  processor, forward, writing: its embedding loop, from embedding_info.json) over the same
  encoder's forward on the same images already preprocessed into tensors in memory; same batch,
  same torch threads (the command gets --dataloader_num_workers on top). Target >= 0.9.
* ``pipeline_ratio``: barlow-embed's images/s over `pipeline("image-feature-extraction",
  batch_size=B)` on the same images (decoded PIL images in a list: the loop a user writes today).
  Target >= 1.5.
* ``peak_rss``: the command's peak resident set (main process) at 10k and at 60k images; growth
  target <= 10%.
* ``search_latency_s``: exact (chunked matmul) and FAISS (IndexFlatIP) for 1 and 1000 queries over
  60k and 1M random vectors of the encoder's width; medians of alternated runs.
* ``retrieval``: Fashion-MNIST test images as queries against the train index, cosine: recall@1
  (the nearest train image has the query's class) and mAP@R (R = the class's train count), for the
  pretrained encoder, the same architecture randomly initialised, and raw pixels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import MEMORY_WORKER_ENV, RESULTS_DIR, alternate, median, timed, write_result  # noqa: E402

BIN = Path(sys.executable).parent


def cpu_flags() -> dict:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {"avx512_bf16": "avx512_bf16" in flags, "amx": any(f.startswith("amx") for f in flags)}


def run_embed(model: str, data: Path, out: Path, split: str, threads: int, workers: int, batch: int,
              max_samples: int | None = None, memory_env: bool = False, options: tuple[str, ...] = ()) -> dict:
    """barlow-embed (with extra command-line ``options``) in a fresh process; its embedding_info.json
    and its peak RSS (bytes, main process)."""
    args = [str(BIN / "barlow-embed"), "--model_name_or_path", model, "--dataset_name", str(data), "--train_split",
            split, "--output_dir", str(out), "--overwrite_output_dir", "--per_device_eval_batch_size", str(batch),
            "--dataloader_num_workers", str(workers), *(["--max_train_samples", str(max_samples)] if max_samples else []),
            *options]
    # The wrapper reports the largest resident set among its waited-for children: the command itself.
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    # The project's memory method (common.MEMORY_WORKER_ENV): a fixed glibc mmap threshold, so freed tensors leave
    # the resident set and the peak follows live memory rather than the allocator's history.
    # Only for the memory part: a process's speed is measured as users run it.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           **(MEMORY_WORKER_ENV if memory_env else {})}
    result = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    info = json.loads((out / "embedding_info.json").read_text())
    info["peak_rss_bytes"] = int(result.stdout.strip().splitlines()[-1]) * 1024
    return info


def load_split(data: Path, split: str, limit: int | None = None):
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(data / f"{split}-*.parquet"), split="train")
    return table.select(range(min(limit, len(table)))) if limit else table


# The settings the throughput part compares: barlow-embed's defaults, and its fast CPU options (which
# the in-memory forward gets too, so `ratio` stays the cost of everything but the forward).
SETTINGS = {
    "fp32": {"options": (), "to": {}},
    "bf16_channels_last": {"options": ("--mixed_precision", "bf16", "--channels_last"),
                           "to": {"autocast_dtype": torch.bfloat16, "channels_last": True}},
}


def throughput(args, model_dir: str, work: Path) -> dict:
    """Images/s of barlow-embed and of the in-memory forward under each of --settings, and of the
    pipeline (the user's loop as it is: fp32), alternated in this session, on the first
    --max_images training images."""
    from transformers import pipeline

    from training.embedding.encoder import load_encoder

    torch.set_num_threads(args.threads)
    table = load_split(args.data_dir, "train", args.max_images)
    images = [image.convert("RGB") for image in table["image"]]
    encoder = load_encoder(model_dir)
    pixels = torch.cat([encoder.preprocess(images[i : i + 1024]) for i in range(0, len(images), 1024)])
    extractor = pipeline("image-feature-extraction", model=model_dir, device="cpu")

    def in_memory(setting: str):
        configured = load_encoder(model_dir).to("cpu", **SETTINGS[setting]["to"])

        def measure() -> float:
            seconds = timed(lambda: [configured(pixels[i : i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)])
            return len(pixels) / seconds
        return measure

    def command(setting: str):
        def measure() -> float:
            info = run_embed(model_dir, args.data_dir, work / "throughput", "train", args.threads, args.workers,
                             args.batch_size, args.max_images, options=SETTINGS[setting]["options"])
            return info["images_per_second"]
        return measure

    def with_pipeline() -> float:
        seconds = timed(lambda: extractor(images, batch_size=args.batch_size, pool=True))
        return len(images) / seconds

    contenders = {"pipeline": with_pipeline}
    for setting in args.settings:
        contenders |= {f"barlow_embed/{setting}": command(setting), f"in_memory_forward/{setting}": in_memory(setting)}
    rates = alternate(contenders, runs=args.runs, warmup=1)
    return {name: median(values) for name, values in rates.items()} | {"runs": rates}


def mean_average_precision_at_r(relevant: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """mAP@R per query: (Q, Rmax) relevance of the ranked hits, R per query (Musgrave et al., 2020)."""
    ranks = torch.arange(1, relevant.shape[1] + 1)
    within = ranks[None, :] <= r[:, None]
    hits = (relevant & within).float()
    precision = hits.cumsum(1) / ranks[None, :]
    return (precision * hits).sum(1) / r.float()


def retrieval(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
              chunk: int = 500) -> dict:
    """recall@1 and mAP@R of test queries against the train index, cosine similarity."""
    x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(train, np.float32)), dim=1)
    q = torch.nn.functional.normalize(torch.from_numpy(np.asarray(test, np.float32)), dim=1)
    y_train, y_test = torch.from_numpy(np.asarray(train_labels)), torch.from_numpy(np.asarray(test_labels))
    counts = torch.bincount(y_train)
    r_max = int(counts.max())
    recall, average_precision = [], []
    for start in range(0, len(q), chunk):
        rows = (q[start : start + chunk] @ x.T).topk(r_max, dim=1).indices
        relevant = y_train[rows] == y_test[start : start + chunk, None]
        recall.append(relevant[:, 0].float())
        average_precision.append(mean_average_precision_at_r(relevant, counts[y_test[start : start + chunk]]))
    return {"recall_at_1": round(float(torch.cat(recall).mean()), 4),
            "map_at_r": round(float(torch.cat(average_precision).mean()), 4)}


def embedded(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    table = datasets.load_dataset(str(folder), split="train").with_format("numpy")
    order = np.argsort(table["id"])
    return np.asarray(table["embedding"])[order], np.asarray(table["label"])[order]


def search_latency(dimension: int, runs: int, sizes: tuple[int, ...] = (60_000, 1_000_000)) -> dict:
    from training.embedding.index import EmbeddingIndex, faiss_available

    out: dict = {}
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        vectors = torch.nn.functional.normalize(torch.randn(size, dimension, generator=generator), dim=1)
        index = EmbeddingIndex(vectors, {"id": list(range(size))}, {"key": "id"})
        backends = ["exact"] + (["faiss"] if faiss_available() else [])
        if "faiss" in backends:
            index.search(vectors[:1], k=10, backend="faiss")  # builds the FAISS index once, outside the timing
        for queries in (1, 1000):
            batch = torch.randn(queries, dimension, generator=generator)
            contenders = {b: (lambda b=b: timed(lambda: index.search(batch, k=10, backend=b))) for b in backends}
            times = alternate(contenders, runs=runs, warmup=1)
            for backend, values in times.items():
                out[f"{backend}_{size}_vectors_{queries}_queries"] = round(median(values), 5)
        del index, vectors
    return out


PARTS = ("throughput", "memory", "quality", "latency")
DETAIL_KEYS = ("pipeline_ratio", "by_setting", "images_per_second", "images_per_second_by_contender",
               "images_per_second_runs", "throughput_settings", "peak_rss_bytes",
               "peak_rss_growth_10k_to_60k", "retrieval", "pretrained_encoder", "search_latency_s", "search_settings",
               "measured", "cpu_flags", "targets")


def _random_init_folder(args) -> str:
    if args.random_init_dir:
        return args.random_init_dir
    from transformers import AutoConfig

    from modeling_barlow import BarlowTwinsForPreTraining, create_image_processor

    folder = str(args.work_dir / "random_init")
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model_dir)
    BarlowTwinsForPreTraining(config).save_pretrained(folder)
    create_image_processor(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a barlow-pretrain output folder (the pretrained encoder)")
    parser.add_argument("--random_init_dir", help="the same architecture randomly initialised (made here if absent)")
    parser.add_argument("--data_dir", type=Path, help="Fashion-MNIST parquet shards (made under --work_dir if absent)")
    parser.add_argument("--work_dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for every contender")
    parser.add_argument("--workers", type=int, default=1, help="barlow-embed's --dataloader_num_workers")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_images", type=int, default=10_000, help="images in the throughput comparison")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=None,
                        help="barlow-embed settings to time, each against the in-memory forward under the same "
                             "settings; the first is the headline. Default: bf16_channels_last fp32 on a CPU with "
                             "bf16 instructions (AVX512-BF16 or AMX: there, the options users are told to pass), "
                             "else fp32 alone")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to measure; the other parts' numbers already in the results file are kept")
    parser.add_argument("--pretrained_description", default="", help="what the pretrained encoder is, for the record")
    parser.add_argument("--smoke", action="store_true", help="a few thousand images: checks the plumbing, writes "
                                                             "WORK_DIR/embed.json only")
    args = parser.parse_args()
    if args.settings is None:
        args.settings = ["bf16_channels_last", "fp32"] if any(cpu_flags().values()) else ["fp32"]
    caps = {"small": 10_000, "train": None, "test": None, "sizes": (60_000, 1_000_000)}
    if args.smoke:
        args.max_images, args.runs = 500, 1
        caps = {"small": 500, "train": 3000, "test": 500, "sizes": (6_000, 20_000)}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.data_dir is None:
        from fashion_mnist import IDX_DIR, convert

        args.data_dir = convert(IDX_DIR, args.work_dir / "data")
    results_dir = args.work_dir if args.smoke else RESULTS_DIR
    earlier = json.loads((results_dir / "embed.json").read_text()) if (results_dir / "embed.json").is_file() else {}
    details = {k: v for k, v in earlier.get("details", {}).items() if k in DETAIL_KEYS}
    details.setdefault("measured", {})
    if earlier and "measured" not in earlier.get("details", {}):  # a file from before --parts: when its parts ran
        for part, key in (("throughput", "images_per_second"), ("memory", "peak_rss_bytes"), ("quality", "retrieval"),
                          ("latency", "search_latency_s")):
            if key in details:
                details["measured"][part] = {"date": earlier["date"], "command": earlier["command"],
                                             "load_average": earlier["details"].get("load_average_at_end")}
    started = time.time()
    dimension = None

    if "throughput" in args.parts:
        speed = throughput(args, args.model_dir, args.work_dir)
        print(json.dumps(speed, indent=2), flush=True)
        # The headline is the first of --settings; every setting's ratios are in "by_setting".
        headline = args.settings[0]
        by_setting = {s: {"ratio": round(speed[f"barlow_embed/{s}"] / speed[f"in_memory_forward/{s}"], 4),
                          "pipeline_ratio": round(speed[f"barlow_embed/{s}"] / speed["pipeline"], 4),
                          "barlow_embed_options": " ".join(SETTINGS[s]["options"]) or "(defaults)"}
                      for s in args.settings}
        details.update({
            "pipeline_ratio": by_setting[headline]["pipeline_ratio"],
            "by_setting": by_setting,
            "images_per_second": {"barlow_embed": round(speed[f"barlow_embed/{headline}"], 1),
                                  "in_memory_forward": round(speed[f"in_memory_forward/{headline}"], 1),
                                  "pipeline": round(speed["pipeline"], 1)},
            "images_per_second_by_contender": {k: round(v, 1) for k, v in speed.items() if k != "runs"},
            "images_per_second_runs": speed["runs"],
            "throughput_settings": {"threads": args.threads, "dataloader_num_workers": args.workers,
                                    "batch_size": args.batch_size, "images": args.max_images, "runs": args.runs,
                                    "headline_setting": headline,
                                    "pipeline": "fp32, the pipeline's defaults (the loop a user writes today)"},
        })

    if "memory" in args.parts:
        rss = {}
        for label, cap, name in (("10k_images", caps["small"], "train_10k"), ("60k_images", caps["train"], "train_60k")):
            measured = run_embed(args.model_dir, args.data_dir, args.work_dir / name, "train", args.threads,
                                 args.workers, args.batch_size, cap, memory_env=True)
            rss[label], dimension = measured["peak_rss_bytes"], measured["dimension"]
        details.update({"peak_rss_bytes": rss, "peak_rss_growth_10k_to_60k": round(rss["60k_images"] / rss["10k_images"] - 1, 4)})
        print(json.dumps(rss), flush=True)

    if "quality" in args.parts:
        quality = {}
        for name, model in (("pretrained", args.model_dir), ("random_init", _random_init_folder(args))):
            for split in ("train", "test"):
                measured = run_embed(model, args.data_dir, args.work_dir / f"{name}_{split}", split, args.threads,
                                     args.workers, args.batch_size, caps[split])
                dimension = measured["dimension"]
            quality[name] = retrieval(*embedded(args.work_dir / f"{name}_train"), *embedded(args.work_dir / f"{name}_test"))
            print(name, quality[name], flush=True)
        train, test = load_split(args.data_dir, "train", caps["train"]), load_split(args.data_dir, "test", caps["test"])
        pixels = lambda t: np.stack([np.asarray(im, np.float32).reshape(-1) for im in t["image"]])  # noqa: E731
        quality["raw_pixels"] = retrieval(pixels(train), np.asarray(train["label"]), pixels(test), np.asarray(test["label"]))
        print("raw_pixels", quality["raw_pixels"], flush=True)
        details.update({"retrieval": quality, "pretrained_encoder": args.pretrained_description or args.model_dir})

    if "latency" in args.parts:
        if dimension is None:
            dimension = load_dimension(args.model_dir)
        details["search_latency_s"] = search_latency(dimension, args.runs, caps["sizes"])
        details["search_settings"] = {"k": 10, "runs": args.runs, "dimension": dimension,
                                      "faiss_index": "IndexFlatIP (factory 'Flat')"}
        print(json.dumps(details["search_latency_s"], indent=2), flush=True)

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for part in args.parts:
        details["measured"][part] = {"date": when, "load_average": [round(v, 2) for v in os.getloadavg()],
                                     "command": " ".join(sys.argv)}
    details.update({"cpu_flags": cpu_flags(),
                    "targets": {"ratio": ">= 0.9", "pipeline_ratio": ">= 1.5", "peak_rss_growth_10k_to_60k": "<= 0.10"}})
    details["wall_time_s_last_run"] = round(time.time() - started, 1)
    rates = details.get("images_per_second", {})
    write_result("embed", ours=rates.get("barlow_embed", 0.0), baseline=rates.get("in_memory_forward", 1.0),
                 unit="images/s", higher_is_better=True, target="ratio >= 0.9", details=details, results_dir=results_dir)


def load_dimension(model_dir: str) -> int:
    from training.embedding.encoder import load_encoder

    return load_encoder(model_dir).dimension


if __name__ == "__main__":
    main()
