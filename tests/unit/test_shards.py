import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import prepare
from genderid import celeba, shards
from genderid.celeba import read_celeba




def test_schema_and_round_trip(synthetic_celeba, tmp_path):
    manifest = prepare(synthetic_celeba, tmp_path / "out", rows_per_shard=100)
    assert len(manifest["files"]) == 3  # 240 rows in shards of at most 100
    for name in manifest["files"]:
        table = pq.read_table(tmp_path / "out" / name)
        assert table.schema.equals(shards.SCHEMA) and table.num_rows <= 100
    table = shards.read_table(str(tmp_path / "out"))
    index = read_celeba(str(synthetic_celeba))
    assert table["image_id"].to_pylist() == index.image_ids
    first = table.slice(0, 1).to_pylist()[0]
    assert first["image"] == (synthetic_celeba / celeba.IMAGE_DIR / "000001.jpg").read_bytes()  # not re-encoded
    assert first["male"] == index.male[0] and first["identity"] == index.identity[0]
    attributes = np.stack([table[name].to_numpy() for name in celeba.ATTRIBUTES], axis=1)
    assert np.array_equal(attributes, index.attributes)
    assert np.array_equal(table["split"].to_numpy(), index.partition)
    counts = manifest["counts"]
    assert sum(c["total"] for c in counts.values()) == manifest["rows"] == 240
    assert counts["train"]["male"] == int(index.male[index.partition == 0].sum())
    assert manifest["skipped"] == {"count": 0, "images": []}


def test_corrupt_images_are_skipped_counted_and_listed(synthetic_celeba, tmp_path):
    import shutil

    folder = tmp_path / "src"
    shutil.copytree(synthetic_celeba, folder)
    (folder / celeba.IMAGE_DIR / "000005.jpg").write_bytes(b"garbage")
    data = (folder / celeba.IMAGE_DIR / "000006.jpg").read_bytes()
    (folder / celeba.IMAGE_DIR / "000006.jpg").write_bytes(data[: len(data) // 2])  # truncated
    manifest = prepare(folder, tmp_path / "out")
    assert manifest["rows"] == 238 and manifest["skipped"]["count"] == 2
    assert [s["image_id"] for s in manifest["skipped"]["images"]] == ["000005.jpg", "000006.jpg"]
    assert "000005.jpg" not in shards.read_table(str(tmp_path / "out"), ["image_id"])["image_id"].to_pylist()


def crash_after(n_shards):
    def run_tasks(fn, specs):
        for spec in specs[:n_shards]:
            fn(spec)
        raise KeyboardInterrupt("interrupted")
    return run_tasks


def test_interrupted_first_prepare_leaves_nothing_that_looks_complete(synthetic_celeba, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(synthetic_celeba, out, run_tasks=crash_after(1))
    assert any(out.iterdir())  # a shard was written...
    with pytest.raises(shards.DatasetError, match="not a prepared data set"):
        shards.read_table(str(out))  # ...but it is not a data set


def test_interrupted_rerun_keeps_the_old_data_set_and_next_run_replaces_it_cleanly(synthetic_celeba, tmp_path):
    out = tmp_path / "out"
    old = prepare(synthetic_celeba, out, rows_per_shard=100)
    with pytest.raises(KeyboardInterrupt):
        prepare(synthetic_celeba, out, rows_per_shard=50, run_tasks=crash_after(2))
    assert shards.read_manifest(str(out)) == old
    assert shards.read_table(str(out)).num_rows == 240
    new = prepare(synthetic_celeba, out, rows_per_shard=50)
    assert len(new["files"]) == 5 and shards.read_table(str(out)).num_rows == 240
    folders = {p.name for p in out.iterdir() if p.is_dir()}
    assert folders == {new["files"][0].split("/")[0]}  # old and crashed versions are gone
    assert json.loads((out / shards.MANIFEST).read_text()) == new


def test_refuses_a_foreign_non_empty_destination(synthetic_celeba, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(shards.DatasetError, match="precious.txt"):
        prepare(synthetic_celeba, out)
    assert (out / "precious.txt").read_text() == "keep me"


def test_shard_table_keeps_null_identity():
    table = shards.shard_table(["a.jpg"], [b"x"], np.array([0]), np.zeros((1, 40), np.int8))
    assert table.schema.equals(shards.SCHEMA) and table["identity"].to_pylist() == [None]
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    assert pq.read_table(io.BytesIO(buffer.getvalue()))["identity"].null_count == 1
