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


def test_prepare_align_on_ray_data_stores_aligned_faces_and_counts_photos_without_one(ray_cluster, face_scenes,
                                                                                    tmp_path):
    import io

    from PIL import Image

    from conftest import write_celeba_folder
    from genderid.faces import TEMPLATE_FRAME

    photos = [(face_scenes[1].photo, 1, 0), (face_scenes[2].photo, 0, 1), (face_scenes[3].photo, 1, 2),
              (face_scenes[0].photo, 0, 0)]
    folder = write_celeba_folder(tmp_path / "photos", photos)
    out = tmp_path / "aligned"
    assert main(["prepare", "--align", "--celeba", str(folder), "--out", str(out), "--rows-per-shard", "2"]) == 0
    manifest = shards.read_manifest(str(out))
    assert manifest["rows"] == 3 and manifest["aligned"]["no_face"] == {"count": 1, "images": ["000004.jpg"]}
    images = shards.read_table(str(out))["image"].to_pylist()
    assert all(Image.open(io.BytesIO(data)).size == TEMPLATE_FRAME for data in images)
