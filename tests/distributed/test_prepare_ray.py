"""`genderid prepare` on Ray Data, local and on S3."""
import pytest

from conftest import upload_folder
from genderid import shards
from genderid.cli import main

pytestmark = pytest.mark.ray


def test_prepare_cli_on_ray_data(ray_cluster, synthetic_celeba, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert main(["prepare", "--celeba", str(synthetic_celeba), "--out", str(out), "--rows-per-shard", "64"]) == 0
    manifest = shards.read_manifest(str(out))
    assert manifest["rows"] == 240 and len(manifest["files"]) == 4
    assert sorted(shards.read_table(str(out), ["image_id"])["image_id"].to_pylist()) == \
        [f"{i:06d}.jpg" for i in range(1, 241)]
    assert "prepared 240 rows in 4 shard(s)" in capsys.readouterr().out


def test_prepare_balanced_recipe(ray_cluster, synthetic_celeba, tmp_path):
    out = tmp_path / "balanced"
    assert main(["prepare", "--celeba", str(synthetic_celeba), "--out", str(out), "--split", "balanced",
                 "--per-class", "50", "--test-per-class", "10"]) == 0
    counts = shards.read_manifest(str(out))["counts"]
    assert counts["train"] == {"male": 40, "female": 40, "total": 80}
    assert counts["val"] == {"male": 10, "female": 10, "total": 20}
    assert counts["test"] == {"male": 10, "female": 10, "total": 20}


def test_prepare_from_and_to_s3(ray_cluster, s3_server, synthetic_celeba):
    source = upload_folder(synthetic_celeba, f"s3://{s3_server['bucket']}/celeba-prepare")
    out = f"s3://{s3_server['bucket']}/prepared"
    assert main(["prepare", "--celeba", source, "--out", out]) == 0
    assert shards.read_table(out).num_rows == 240
    assert main(["prepare", "--celeba", source, "--out", out, "--rows-per-shard", "500"]) == 0  # replaces cleanly
    manifest = shards.read_manifest(out)
    assert len(manifest["files"]) == 1 and shards.read_table(out).num_rows == 240


def test_bad_input_is_a_clear_error(ray_cluster, tmp_path, capsys):
    assert main(["prepare", "--celeba", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "list_attr_celeba.txt: file not found" in capsys.readouterr().err
