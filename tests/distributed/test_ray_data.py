"""`genderid.ray_data` on the shared local cluster: how a split is read, pass after pass."""
import pytest

from genderid import shards
from genderid.preprocess import Preprocessing
from genderid.ray_data import load_split

pytestmark = pytest.mark.ray


def test_a_split_is_listed_once_and_every_pass_reads_each_row_once(prepared):
    import ray.data

    source = str(prepared / "prepared")
    context = ray.data.DataContext.get_current()
    before = (context.use_datasource_v2, context.enable_progress_bars)
    dataset = load_split(source, "val", Preprocessing(image_size=(32, 32)))
    # The reader is picked through the caller's context, which is left as it was.
    assert (context.use_datasource_v2, context.enable_progress_bars) == before

    table = shards.read_table(source, ["image_id", "split"])
    val_ids = sorted(table.filter(table["split"].to_numpy() == 1)["image_id"].to_pylist())
    for _ in range(2):
        ids = [i for batch in dataset.iter_batches(batch_size=16) for i in batch["image_id"]]
        assert sorted(ids) == val_ids
    # Ray 2.60's default Parquet reader runs a file-listing task (a whole CPU, ~1.2 s) at the start of every pass.
    stats = dataset.stats()
    assert "ReadParquet" in stats and "ListFiles" not in stats


def test_a_split_in_one_file_reaches_train_as_several_blocks(ray_cluster, synthetic_celeba, tmp_path):
    """Ray Train's streaming split hands out whole blocks: a split read as one block trains on one rank while the
    others wait in DDP's join() (Ray 2.60's default reader did that to small data sets, the demo's included)."""
    from genderid.prepare import prepare

    prepare(str(synthetic_celeba), str(tmp_path / "one-file"))
    source = str(tmp_path / "one-file")
    assert len(shards.shard_uris(source)) == 1
    dataset = load_split(source, "train", Preprocessing(image_size=(32, 32)), augment=True, tasks=2)
    assert dataset.materialize().num_blocks() >= 2
