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
