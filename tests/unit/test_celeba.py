import numpy as np
import pytest

from genderid import celeba
from genderid.celeba import ATTRIBUTES, CelebaFormatError, balanced_split, read_celeba


def copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_reads_synthetic_folder(synthetic_celeba):
    index = read_celeba(str(synthetic_celeba))
    assert len(index.image_ids) == 240 and index.attributes.shape == (240, 40)
    assert set(np.unique(index.attributes)) <= {0, 1}
    assert set(np.unique(index.partition)) == {0, 1, 2}
    assert index.identity is not None and index.identity.dtype == np.int32
    assert 0 < index.male.sum() < 240


def test_crlf_and_lf_give_the_same_index(synthetic_celeba, tmp_path):
    folder = copy_folder(synthetic_celeba, tmp_path / "crlf")
    for name in (celeba.ATTR_FILE, celeba.PARTITION_FILE, celeba.IDENTITY_FILE):
        path = folder / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    a, b = read_celeba(str(synthetic_celeba)), read_celeba(str(folder))
    assert a.image_ids == b.image_ids and np.array_equal(a.attributes, b.attributes)
    assert np.array_equal(a.partition, b.partition)


def test_optional_files_may_be_absent(synthetic_celeba, tmp_path):
    folder = copy_folder(synthetic_celeba, tmp_path / "noid")
    (folder / celeba.IDENTITY_FILE).unlink()
    (folder / celeba.PARTITION_FILE).unlink()
    index = read_celeba(str(folder))
    assert index.identity is None and index.partition is None
    with pytest.raises(CelebaFormatError, match="official"):
        celeba.official_split(index)


def edit_line(path, number, new):
    lines = path.read_text().splitlines()
    lines[number - 1] = new
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("number, new, message", [
    (1, "many", r"list_attr_celeba.txt line 1: expected the image count"),
    (1, "9999", r"list_attr_celeba.txt line 1: says 9999 images"),
    (2, " ".join(ATTRIBUTES[:-1] + ("Sparkly",)), r"line 2: unknown attribute 'Sparkly'"),
    (2, " ".join(ATTRIBUTES[:-1]), r"line 2: expected the 40 CelebA attribute names, missing \['Young'\]"),
    (5, "000003.jpg 1 -1", r"line 5: expected an image name and 40 values, got 3"),
    (6, "000004.jpg " + " ".join(["1"] * 39 + ["0"]), r"line 6: attribute Young must be 1 or -1, got '0'"),
    (7, "000001.jpg " + " ".join(["1"] * 40), r"line 7: image 000001.jpg is listed twice"),
])
def test_malformed_attribute_file_errors_name_file_and_line(synthetic_celeba, tmp_path, number, new, message):
    folder = copy_folder(synthetic_celeba, tmp_path / "bad")
    edit_line(folder / celeba.ATTR_FILE, number, new)
    with pytest.raises(CelebaFormatError, match=message):
        read_celeba(str(folder))


@pytest.mark.parametrize("new, message", [
    ("000002.jpg 7", r"list_eval_partition.txt line 2: value must be one of \[0, 1, 2\], got 7"),
    ("000002.jpg", r"list_eval_partition.txt line 2: expected '<image> <number>'"),
    ("000002.jpg x", r"list_eval_partition.txt line 2: 'x' is not an integer"),
    ("000001.jpg 0", r"list_eval_partition.txt line 2: image 000001.jpg is listed twice"),
])
def test_malformed_partition_file(synthetic_celeba, tmp_path, new, message):
    folder = copy_folder(synthetic_celeba, tmp_path / "bad")
    edit_line(folder / celeba.PARTITION_FILE, 2, new)
    with pytest.raises(CelebaFormatError, match=message):
        read_celeba(str(folder))


def test_image_without_partition_entry(synthetic_celeba, tmp_path):
    folder = copy_folder(synthetic_celeba, tmp_path / "bad")
    lines = (folder / celeba.PARTITION_FILE).read_text().splitlines()
    (folder / celeba.PARTITION_FILE).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CelebaFormatError, match=r"list_eval_partition.txt: no entry for image 000240.jpg"):
        read_celeba(str(folder))


def test_missing_image_file_is_named(synthetic_celeba, tmp_path):
    folder = copy_folder(synthetic_celeba, tmp_path / "bad")
    (folder / celeba.IMAGE_DIR / "000010.jpg").unlink()
    with pytest.raises(CelebaFormatError, match=r"000010.jpg: image listed in list_attr_celeba.txt line 12"):
        read_celeba(str(folder))


def test_missing_attribute_file(tmp_path):
    with pytest.raises(CelebaFormatError, match="list_attr_celeba.txt: file not found"):
        read_celeba(str(tmp_path))


def test_balanced_split_follows_the_seed_recipe(synthetic_celeba):
    index = read_celeba(str(synthetic_celeba))
    n_male, n_female = int(index.male.sum()), int((index.male == 0).sum())
    per_class, test_per_class = 40, 10
    split = balanced_split(index, per_class, test_per_class, seed=0)
    for label in (0, 1):
        rows = np.flatnonzero(index.male == label)
        assert set(split[rows[:per_class]]) <= {0, 1}
        assert np.sum(split[rows[:per_class]] == 1) == 8  # 20% validation per class
        assert np.all(split[rows[-test_per_class:]] == 2)  # the last images of each class are the test set
        assert np.all(split[rows[per_class:-test_per_class]] == -1)
    assert np.sum(split == 2) == 2 * test_per_class
    assert np.array_equal(split, balanced_split(index, per_class, test_per_class, seed=0))
    assert not np.array_equal(split, balanced_split(index, per_class, test_per_class, seed=1))
    with pytest.raises(ValueError, match=f"the data set has {min(n_male, n_female)}"):
        balanced_split(index, max(n_male, n_female), 0)


def test_selection_split_holds_out_train_identities_for_model_selection():
    rng = np.random.default_rng(3)
    n = 600
    identity = rng.integers(0, 120, n).astype(np.int32)
    partition = np.where(identity < 80, 0, np.where(identity < 100, 1, 2)).astype(np.int8)  # identity-disjoint
    partition[:3] = 1  # ... except three official val images of train identities (CelebA's own files could)
    attributes = np.zeros((n, len(ATTRIBUTES)), np.int8)
    index = celeba.CelebaIndex(root="r", image_ids=[f"{i:06d}.jpg" for i in range(n)], attributes=attributes,
                               partition=partition, identity=identity)
    split = celeba.selection_split(index, select_fraction=0.1, seed=0)
    groups = {code: set(identity[split == code]) for code in (0, 1, 2)}
    assert groups[0] and groups[1] and groups[2]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert len(groups[1]) == round(len(set(identity[partition == 0])) * 0.1)
    assert np.all(split[partition != 0] == 2)  # everything official val/test is only reported
    assert set(split[(partition == 0) & np.isin(identity, identity[:3])]) == {-1}  # left out, not leaked
    assert np.array_equal(split, celeba.selection_split(index, 0.1, seed=0))
    assert not np.array_equal(split, celeba.selection_split(index, 0.1, seed=1))
    with pytest.raises(CelebaFormatError, match="identity_CelebA.txt"):
        celeba.selection_split(celeba.CelebaIndex("r", index.image_ids, attributes, partition, None))
