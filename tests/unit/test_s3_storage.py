"""s3:// paths against a real S3 server on loopback (moto's standalone server), no Ray."""
import numpy as np
import torch

from conftest import upload_folder
from genderid import storage
from genderid.celeba import read_celeba
from genderid.checkpoint import load_checkpoint, save_checkpoint
from genderid.model import GenderNet
from genderid.preprocess import Preprocessing


def test_celeba_reader_reads_an_s3_prefix(s3_server, synthetic_celeba):
    uri = upload_folder(synthetic_celeba, f"s3://{s3_server['bucket']}/celeba-reader")
    remote, local = read_celeba(uri), read_celeba(str(synthetic_celeba))
    assert remote.image_ids == local.image_ids and np.array_equal(remote.attributes, local.attributes)
    assert remote.image_uri("000001.jpg") == f"{uri}/img_align_celeba/000001.jpg"


def test_checkpoint_round_trip_through_s3(s3_server, tmp_path):
    model = GenderNet(width=0.0625, batch_norm=True).eval()
    local = save_checkpoint(tmp_path / "ckpt", model, preprocessing=Preprocessing(image_size=(32, 32)))
    uri = f"s3://{s3_server['bucket']}/checkpoints/one"
    storage.upload_dir(local, uri)
    loaded = load_checkpoint(uri)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.model(x), model(x)) and loaded.source == uri


def test_prepare_from_s3_fails_on_an_unreadable_object_and_skips_only_undecodable_images(s3_server, tmp_path):
    import io
    import shutil

    import boto3
    import pytest
    from PIL import Image

    from genderid import shards
    from genderid.celeba import IMAGE_DIR, official_split
    from genderid.synth import write_synthetic_celeba

    folder = write_synthetic_celeba(tmp_path / "celeba", n=24, seed=3, size=(40, 48))
    images = folder / IMAGE_DIR
    (images / "000002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # corrupt: skipped
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # ~8 kB that would decode to 64 MP: skipped
    assert len(bomb.getvalue()) < 100_000
    (images / "000003.jpg").write_bytes(bomb.getvalue())
    bucket = s3_server["bucket"]
    uri = upload_folder(folder, f"s3://{bucket}/celeba-prepare")

    def serial(fn, specs):
        return [fn(spec) for spec in specs]

    index = read_celeba(uri)
    manifest = shards.prepare_dataset(index, official_split(index), str(tmp_path / "ok"), {"recipe": "official"},
                                      run_tasks=serial, rows_per_shard=10)
    assert manifest["skipped"]["count"] == 2 and manifest["rows"] == 22
    assert {s["image_id"] for s in manifest["skipped"]["images"]} == {"000002.jpg", "000003.jpg"}

    # An object that was listed but that the store cannot serve fails the prepare, and publishes nothing.
    boto3.client("s3").delete_object(Bucket=bucket, Key="celeba-prepare/img_align_celeba/000007.jpg")
    out = tmp_path / "failed"
    with pytest.raises(shards.DatasetError, match=r"1 image\(s\) could not be read.*000007\.jpg.*nothing was published"):
        shards.prepare_dataset(index, official_split(index), str(out), {"recipe": "official"},
                               run_tasks=serial, rows_per_shard=10)
    assert not (out / shards.MANIFEST).exists() and not [p for p in out.glob("v*") if any(p.iterdir())]
    shutil.rmtree(folder)


def test_vgg16_weights_load_from_s3(s3_server, tmp_path):
    from genderid.config import ModelConfig
    from genderid.model import build_model

    source = GenderNet(width=0.25)
    path = tmp_path / "vgg.pth"
    torch.save(source.state_dict(), path)
    uri = f"s3://{s3_server['bucket']}/weights/vgg.pth"
    storage.write_bytes(uri, path.read_bytes())
    model = build_model(ModelConfig(weights=uri, width=0.25))
    assert torch.equal(model.features[0].weight, source.features[0].weight)


def test_an_s3_checkpoint_is_read_by_fixed_names_only_and_nothing_lands_on_disk(s3_server, tmp_path):
    import os
    import tempfile

    import boto3

    model = GenderNet(width=0.0625, batch_norm=True).eval()
    local = save_checkpoint(tmp_path / "ckpt", model, preprocessing=Preprocessing(image_size=(32, 32)))
    bucket = s3_server["bucket"]
    uri = f"s3://{bucket}/checkpoints/hostile"
    storage.upload_dir(local, uri)
    client = boto3.client("s3")  # objects a listing would hand out: one with `..` in its key, one very large
    client.put_object(Bucket=bucket, Key="checkpoints/hostile/sub/../../../escaped.txt", Body=b"x")
    client.put_object(Bucket=bucket, Key="checkpoints/hostile/huge.bin", Body=b"0" * 3_000_000)
    before = set(os.listdir(tempfile.gettempdir()))
    loaded = load_checkpoint(uri)
    assert loaded.version == load_checkpoint(str(local)).version
    assert set(os.listdir(tempfile.gettempdir())) == before  # no temporary copy, nothing left behind
    assert not list(tmp_path.parent.rglob("escaped.txt"))
