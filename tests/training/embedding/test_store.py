"""The embedding folder's store in process (fast; `make mutate` runs these against its mutants):
shards written at the size asked, complete or absent, numbered on after a resume, the skipped
keys in their metadata, and every reader checked against pyarrow and datasets reading the files."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest

from training.embedding.store import (
    INFO_FILE,
    ShardWriter,
    read_embeddings,
    read_info,
    shard_files,
    summarize,
    write_json_atomically,
    written_keys,
)


def _writer(folder, rank=0, dtype="float32", rows_per_shard=4, features=None, columns=("id", "label")):
    return ShardWriter(folder, rank, 3, dtype, columns, features or {}, rows_per_shard)


def _rows(start: int, count: int) -> tuple[np.ndarray, dict[str, list]]:
    ids = list(range(start, start + count))
    return np.arange(3 * start, 3 * (start + count), dtype=np.float64).reshape(count, 3) / 7, {
        "id": ids, "label": [i % 2 for i in ids]}


def test_shards_close_at_the_first_batch_that_reaches_the_size(tmp_path):
    writer = _writer(tmp_path, rows_per_shard=4)
    for start, count in ((0, 3), (3, 2), (5, 1), (6, 3)):  # 5 rows, then 4
        writer.add(*_rows(start, count))
    assert [p.name for p in shard_files(tmp_path)] == ["train-r000-00000.parquet", "train-r000-00001.parquet"]
    writer.add(*_rows(9, 1))
    writer.close()
    files = shard_files(tmp_path)
    assert [pq.read_metadata(p).num_rows for p in files] == [5, 4, 1]
    assert writer.written_rows == 10 and writer.next_number == 3
    assert not list((tmp_path / "data").glob(".*"))  # no temporary file left
    writer.close()  # nothing left to write: no empty shard
    assert len(shard_files(tmp_path)) == 3
    table = datasets.load_dataset(str(tmp_path), split="train")
    assert table["id"] == list(range(10)) and table["label"] == [i % 2 for i in range(10)]
    np.testing.assert_array_equal(np.asarray(table["embedding"]), (np.arange(30).reshape(10, 3) / 7).astype(np.float32))
    assert table.features["embedding"] == datasets.List(datasets.Value("float32"), length=3)


def test_known_features_survive_and_others_are_inferred_in_the_dtype_asked(tmp_path):
    names = datasets.ClassLabel(names=["even", "odd"])
    writer = _writer(tmp_path, dtype="float16", features={"label": names, "id": datasets.Value("int32")},
                     rows_per_shard=100, columns=("id", "label", "note"))
    ids, values = _rows(0, 3)
    writer.add(ids, {**values, "note": ["a", "b", "c"]})
    writer.close()
    table = datasets.load_dataset(str(tmp_path), split="train")
    assert table.features["label"] == names and table.features["id"] == datasets.Value("int32")
    assert table.features["note"] == datasets.Value("string") and table["note"] == ["a", "b", "c"]
    assert pq.read_schema(shard_files(tmp_path)[0]).field("id").type == "int32"
    assert table.features["embedding"] == datasets.List(datasets.Value("float16"), length=3)
    assert pq.read_schema(shard_files(tmp_path)[0]).field("embedding").type.value_type == "halffloat"


def test_skipped_keys_are_kept_in_the_next_shard_and_counted_once(tmp_path):
    writer = _writer(tmp_path, rows_per_shard=2)
    writer.add(np.empty((0, 3)), {"id": [], "label": []}, skipped=[7])
    writer.add(*_rows(0, 2), skipped=[8])
    writer.add(np.empty((0, 3)), {"id": [], "label": []}, skipped=[9])
    writer.close()  # only a skipped key left: still written, so a resume does not retry it
    files = shard_files(tmp_path)
    assert [pq.read_metadata(p).num_rows for p in files] == [2, 0]
    assert [json.loads(pq.read_schema(p).metadata[b"barlow_skipped"]) for p in files] == [[7, 8], [9]]
    assert written_keys(tmp_path, "id") == {0, 1, 7, 8, 9}
    assert summarize(tmp_path) == {"count": 2, "skipped": 3, "shards": 2}


def test_a_resumed_writer_numbers_on_after_its_own_rank_shards(tmp_path):
    folder = tmp_path / "new" / "emb"  # made with its parents
    first = _writer(folder, rank=1, rows_per_shard=1)
    for start in range(3):
        first.add(*_rows(start, 1))
    other_rank = _writer(folder, rank=0, rows_per_shard=1)
    assert other_rank.next_number == 0
    resumed = _writer(folder, rank=1, rows_per_shard=1)
    assert resumed.next_number == 3 and resumed.written_rows == 0
    resumed.add(*_rows(3, 1))
    other_rank.add(*_rows(4, 1))
    assert [p.name for p in shard_files(folder, rank=1)] == [f"train-r001-0000{i}.parquet" for i in range(4)]
    assert [p.name for p in shard_files(folder, rank=0)] == ["train-r000-00000.parquet"]
    assert [p.name for p in shard_files(folder)][0] == "train-r000-00000.parquet" and len(shard_files(folder)) == 5
    vectors, columns = read_embeddings(folder, ["id"])
    assert columns["id"] == [4, 0, 1, 2, 3]  # name order: rank 0's shard first
    expected = np.concatenate([_rows(i, 1)[0] for i in (4, 0, 1, 2, 3)]).astype(np.float32)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 3)
    np.testing.assert_array_equal(vectors, expected)


def test_reading_float16_shards_gives_float32_and_an_empty_folder_gives_nothing(tmp_path):
    assert read_embeddings(tmp_path, ["id"])[0].shape == (0, 0)
    assert read_embeddings(tmp_path, ["id"])[0].dtype == np.float32
    assert read_embeddings(tmp_path, ["id"])[1] == {"id": []}
    assert summarize(tmp_path) == {"count": 0, "skipped": 0, "shards": 0}
    writer = _writer(tmp_path, dtype="float16", rows_per_shard=100)
    writer.add(*_rows(0, 5))
    writer.close()
    vectors, columns = read_embeddings(tmp_path, ["id", "label"])
    assert vectors.dtype == np.float32 and columns == {"id": [0, 1, 2, 3, 4], "label": [0, 1, 0, 1, 0]}
    np.testing.assert_array_equal(vectors, _rows(0, 5)[0].astype(np.float16).astype(np.float32))


def test_info_file_is_written_atomically_and_read_back_or_explained(tmp_path):
    with pytest.raises(ValueError, match=f"is not an embedding folder \\(no {INFO_FILE}\\); make one with barlow-embed"):
        read_info(tmp_path)
    writer = _writer(tmp_path, rows_per_shard=1)
    writer.add(*_rows(0, 1))
    with pytest.raises(ValueError, match="has embedding shards but no embedding_info.json: its barlow-embed run did not "
                                         "finish; run the same command again to complete it.$"):
        read_info(tmp_path)
    write_json_atomically(tmp_path / INFO_FILE, {"count": 1, "model": "m"})
    assert read_info(tmp_path) == {"count": 1, "model": "m"}
    assert (tmp_path / INFO_FILE).read_text() == '{\n  "count": 1,\n  "model": "m"\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", INFO_FILE]  # no temporary file left
    (tmp_path / INFO_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="embedding_info.json is not valid JSON"):
        read_info(tmp_path)


def test_a_shard_without_skipped_keys_in_its_metadata(tmp_path):
    # Written by another tool (or a version that listed none): nothing was skipped there.
    import pyarrow as pa

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": [5, 6], "embedding": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}),
                   tmp_path / "data" / "train-r000-00000.parquet")
    assert written_keys(tmp_path, "id") == {5, 6}
    assert summarize(tmp_path) == {"count": 2, "skipped": 0, "shards": 1}
