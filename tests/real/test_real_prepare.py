"""The real CelebA subset in ../shared/data (skipped where absent)."""
import pytest

from genderid import shards
from genderid.cli import main

pytestmark = [pytest.mark.real, pytest.mark.ray]


def test_prepare_real_subset(ray_cluster, real_celeba, tmp_path):
    out = tmp_path / "celeba-subset"
    assert main(["prepare", "--celeba", str(real_celeba), "--out", str(out)]) == 0
    manifest = shards.read_manifest(str(out))
    assert manifest["rows"] == 8998 and manifest["skipped"]["count"] == 0
    counts = manifest["counts"]
    assert sum(c["male"] for c in counts.values()) == 3791
    assert counts["train"] == {"male": 3424, "female": 4597, "total": 8021}
    assert counts["val"] == {"male": 367, "female": 610, "total": 977}
