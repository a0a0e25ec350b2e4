"""barlow-search and EmbeddingIndex: the search core against brute force, the installed script's
JSON, pictures and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.embedding.conftest import info, run_cli
from training.embedding.index import EmbeddingIndex, exact_top_k, faiss_available, near_duplicates


def brute_force(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    x = index / np.linalg.norm(index, axis=1, keepdims=True)
    similarity = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarity, order, axis=1), order


def test_chunked_exact_top_k_equals_brute_force():
    rng = np.random.default_rng(0)
    index, queries = rng.normal(size=(1000, 24)).astype(np.float32), rng.normal(size=(37, 24)).astype(np.float32)
    normalise = lambda a: torch.nn.functional.normalize(torch.from_numpy(a), dim=1)  # noqa: E731
    scores, rows = exact_top_k(normalise(queries), normalise(index), k=7, query_chunk=10, index_chunk=128)
    expected_scores, expected_rows = brute_force(queries, index, 7)
    np.testing.assert_array_equal(rows.numpy(), expected_rows)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-5)


def test_near_duplicates_equal_brute_force():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(300, 16)).astype(np.float32)
    base[50] = base[7] + 0.01 * rng.normal(size=16)  # planted near-duplicates
    base[299] = base[7]
    vectors = torch.nn.functional.normalize(torch.from_numpy(base), dim=1)
    found = near_duplicates(vectors, 0.9, chunk=64)
    similarity = vectors.double().numpy() @ vectors.double().numpy().T
    a, b = np.nonzero(np.triu(similarity >= 0.9, k=1))
    assert sorted((i, j) for i, j, _ in found) == sorted(zip(a.tolist(), b.tolist()))
    assert {(7, 299), (7, 50), (50, 299)} <= {(i, j) for i, j, _ in found}
    assert [s for *_, s in found] == sorted((s for *_, s in found), reverse=True)


@pytest.fixture(scope="module")
def digit_index(barlow_model, tmp_path_factory):
    """The first 300 of the digits' train split, embedded with the tiny encoder."""
    out = tmp_path_factory.mktemp("index") / "emb"
    result = run_cli("barlow-embed", "--model_name_or_path", str(barlow_model), "--max_train_samples", "300",
                     "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (the index extra)")
def test_faiss_backend_finds_what_the_exact_search_finds(digit_index):
    index = EmbeddingIndex.load(digit_index)
    queries = index.vectors[:20] + 0.05 * torch.randn(20, index.vectors.shape[1])
    exact_scores, exact_rows = index.search(queries, k=5, backend="exact")
    faiss_scores, faiss_rows = index.search(queries, k=5, backend="faiss")
    np.testing.assert_allclose(faiss_scores.numpy(), exact_scores.numpy(), atol=1e-5)
    assert (faiss_rows[:, 0] == exact_rows[:, 0]).all()


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (the index extra)")
def test_faiss_index_hnsw32_from_the_command_line(digit_index, tmp_path, monkeypatch):
    import faiss

    from training.shared.data import load_image_dataset
    from training.embedding.search import main

    built, real_factory = [], faiss.index_factory

    def index_factory(dimension, factory, metric):
        built.append((dimension, factory, metric))
        return real_factory(dimension, factory, metric)

    monkeypatch.setattr(faiss, "index_factory", index_factory)
    train = load_image_dataset(None, split="train", streaming=False)
    queries = [str(tmp_path / f"q{i}.png") for i in (3, 250)]
    for i, path in zip((3, 250), queries):
        train[i]["image"].save(path)
    main(["--index_dir", str(digit_index), "--query", *queries, "--k", "4", "--backend", "faiss",
          "--faiss_index", "HNSW32", "--output_file", str(tmp_path / "hits.json")])
    assert built == [(32, "HNSW32", faiss.METRIC_INNER_PRODUCT)]  # the graph index, for cosine (unit vectors)
    index = EmbeddingIndex.load(digit_index)
    for entry, own in zip(json.loads((tmp_path / "hits.json").read_text()), (3, 250)):
        assert len(entry["hits"]) == 4 and entry["hits"][0]["id"] == own  # the query is the indexed image
        row = index.columns["id"].index(own)
        for hit in entry["hits"]:  # each score is the cosine of the stored vectors
            other = index.columns["id"].index(hit["id"])
            assert hit["score"] == pytest.approx(float(index.vectors[row] @ index.vectors[other]), abs=1e-4)


def test_search_cli_json_grid_and_map(digit_index, tmp_path):
    from training.shared.data import load_image_dataset

    train = load_image_dataset(None, split="train", streaming=False)
    for i in (3, 250):
        train[i]["image"].save(tmp_path / f"q{i}.png")
    queries = [str(tmp_path / "q3.png"), str(tmp_path / "q250.png")]
    result = run_cli("barlow-search", "--index_dir", str(digit_index), "--query", *queries, "--k", "4",
                     "--output_file", str(tmp_path / "hits.json"), "--grid", str(tmp_path / "hits.png"),
                     "--map", str(tmp_path / "map.png"), "--map_method", "tsne", "--backend", "exact")
    assert result.returncode == 0, result.stderr[-3000:]
    hits = json.loads((tmp_path / "hits.json").read_text())
    assert [entry["query"] for entry in hits] == queries
    index = EmbeddingIndex.load(digit_index)
    for entry, own in zip(hits, (3, 250)):
        assert [set(h) for h in entry["hits"]] == [{"id", "score", "label"}] * 4
        assert entry["hits"][0]["id"] == own and entry["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert entry["hits"][0]["label"] == train[own]["label"]
        scores = [h["score"] for h in entry["hits"]]
        assert scores == sorted(scores, reverse=True)
        # Each score is the cosine of the stored vectors (the query is the indexed image itself).
        row = index.columns["id"].index(own)
        for hit in entry["hits"]:
            other = index.columns["id"].index(hit["id"])
            assert hit["score"] == pytest.approx(float(index.vectors[row] @ index.vectors[other]), abs=1e-4)
    for picture in ("hits.png", "map.png"):
        with Image.open(tmp_path / picture) as image:
            assert image.width > 300 and image.height > 100
            assert len(set(image.convert("L").getdata())) > 20  # drawn on, not blank


def test_duplicates_cli_lists_the_copied_image(barlow_model, image_folder, tmp_path):
    out = tmp_path / "emb"
    assert run_cli("barlow-embed", "--model_name_or_path", str(barlow_model), "--train_dir", str(image_folder),
                   "--output_dir", str(out)).returncode == 0
    result = run_cli("barlow-search", "--index_dir", str(out), "--duplicates", "0.99999")
    assert result.returncode == 0, result.stderr[-3000:]
    pairs = json.loads(result.stdout)
    assert {"0/0.png", "0/0-copy.png"} in [{pair["a"]["path"], pair["b"]["path"]} for pair in pairs]


def test_a_query_with_another_model_is_refused_naming_both(digit_index, other_barlow_model, barlow_model, tmp_path):
    Image.new("L", (32, 32), 128).save(tmp_path / "q.png")
    result = run_cli("barlow-search", "--index_dir", str(digit_index), "--query", str(tmp_path / "q.png"),
                     "--model_name_or_path", str(other_barlow_model))
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert str(other_barlow_model) in message and str(barlow_model) in message and "Traceback" not in result.stderr
    assert info(digit_index)["model"] == str(barlow_model)


def test_unreadable_and_missing_queries_and_an_empty_index(digit_index, barlow_model, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    for query, expected in ((tmp_path / "bad.png", "not a readable image"), (tmp_path / "none.png", "no such file")):
        result = run_cli("barlow-search", "--index_dir", str(digit_index), "--query", str(query))
        assert result.returncode == 2 and "Traceback" not in result.stderr  # a query to change (1 before #35)
        assert f"Query {query}: {expected}" in result.stderr.strip().splitlines()[-1]
    corrupt = tmp_path / "corrupt" / "a"
    corrupt.mkdir(parents=True)
    (corrupt / "x.png").write_bytes(b"\x89PNG broken")
    empty = tmp_path / "empty"
    made = run_cli("barlow-embed", "--model_name_or_path", str(barlow_model), "--train_dir", str(corrupt.parent),
                   "--output_dir", str(empty))
    assert made.returncode == 1 and "No image could be embedded (1 unreadable)" in made.stderr
    result = run_cli("barlow-search", "--index_dir", str(empty), "--query", str(tmp_path / "bad.png"))
    assert result.returncode == 1 and "is empty" in result.stderr.strip().splitlines()[-1]
    usage = run_cli("barlow-search", "--index_dir", str(digit_index))
    assert usage.returncode == 2 and "Nothing to do" in usage.stderr


def test_importing_the_library_imports_neither_gradio_nor_faiss():
    code = ("import sys, training.embedding, training.embedding.search, training.embedding.web; "
            "sys.exit(int(any(m in sys.modules for m in ('gradio', 'faiss'))))")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0
