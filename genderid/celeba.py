"""Reader of the official CelebA text files, and the split recipes.

Layout (local folder or ``s3://`` prefix)::

    img_align_celeba/000001.jpg ...
    list_attr_celeba.txt        count line, a header of the 40 attribute names, then "<image> +1/-1 x 40"
    list_eval_partition.txt     "<image> <0|1|2>"  (0 train, 1 val, 2 test)
    identity_CelebA.txt         "<image> <person id>"   (optional)

Lines may end in LF or CRLF. Every malformed input raises :class:`CelebaFormatError` naming the file and line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from genderid import storage
from genderid.errors import UserError

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)
MALE = ATTRIBUTES.index("Male")
IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IDENTITY_FILE = "identity_CelebA.txt"
SPLITS = {"train": 0, "val": 1, "test": 2}
SPLIT_RECIPES = ("official", "balanced", "selection")


class CelebaFormatError(UserError, ValueError):
    """A CelebA file is missing or malformed; the message names the file and line."""


class SplitError(UserError, ValueError):
    """A split request the data set cannot satisfy (e.g. more balanced images than it has)."""


@dataclass
class CelebaIndex:
    """Everything the text files say, one entry per image, in attribute-list order."""

    root: str
    image_ids: list[str]
    attributes: np.ndarray  # int8 [N, 40], 1 present / 0 absent, columns in ATTRIBUTES order
    partition: Optional[np.ndarray]  # int8 [N] (0 train, 1 val, 2 test), None without the partition file
    identity: Optional[np.ndarray]  # int32 [N], None without the identity file

    @property
    def male(self) -> np.ndarray:
        return self.attributes[:, MALE]

    def image_uri(self, image_id: str) -> str:
        return storage.join(self.root, IMAGE_DIR, image_id)


def _lines(root: str, name: str, required: bool = True) -> Optional[list[str]]:
    uri = storage.join(root, name)
    if not storage.exists(uri):
        if required:
            raise CelebaFormatError(f"{uri}: file not found (expected the official CelebA layout)")
        return None
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CelebaFormatError(f"{uri}: not a UTF-8 text file ({exc})") from None
    return text.splitlines()  # handles LF and CRLF alike


def parse_attributes(lines: list[str], name: str = ATTR_FILE) -> tuple[list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt`` lines into image ids and a 1/0 int8 matrix in ATTRIBUTES order."""
    if len(lines) < 2:
        raise CelebaFormatError(f"{name}: needs a count line and a header line, found {len(lines)} line(s)")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise CelebaFormatError(f"{name} line 1: expected the image count, got {lines[0].strip()!r}") from None
    header = lines[1].split()
    unknown = [h for h in header if h not in ATTRIBUTES]
    if unknown:
        raise CelebaFormatError(f"{name} line 2: unknown attribute {unknown[0]!r}")
    if sorted(header) != sorted(ATTRIBUTES):
        missing = [a for a in ATTRIBUTES if a not in header]
        what = f"missing {missing}" if missing else "duplicate names"
        raise CelebaFormatError(f"{name} line 2: expected the 40 CelebA attribute names, {what}")
    order = [header.index(a) for a in ATTRIBUTES]
    ids: list[str] = []
    rows: list[list[int]] = []
    seen: set[str] = set()
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 41:
            raise CelebaFormatError(
                f"{name} line {number}: expected an image name and 40 values, got {len(fields)} field(s)")
        image_id, values = fields[0], fields[1:]
        if image_id in seen:
            raise CelebaFormatError(f"{name} line {number}: image {image_id} is listed twice")
        bad = [(header[i], v) for i, v in enumerate(values) if v not in ("1", "-1", "+1")]
        if bad:
            raise CelebaFormatError(f"{name} line {number}: attribute {bad[0][0]} must be 1 or -1, got {bad[0][1]!r}")
        seen.add(image_id)
        ids.append(image_id)
        rows.append([1 if values[i] != "-1" else 0 for i in order])
    if len(ids) != count:
        raise CelebaFormatError(f"{name} line 1: says {count} images, but {len(ids)} rows follow")
    return ids, np.asarray(rows, dtype=np.int8).reshape(len(ids), len(ATTRIBUTES))


def parse_mapping(lines: list[str], name: str, allowed: Optional[set[int]] = None) -> dict[str, int]:
    """Parse ``<image> <int>`` lines (partition or identity file)."""
    mapping: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise CelebaFormatError(f"{name} line {number}: expected '<image> <number>', got {line.strip()!r}")
        try:
            value = int(fields[1])
        except ValueError:
            raise CelebaFormatError(f"{name} line {number}: {fields[1]!r} is not an integer") from None
        if allowed is not None and value not in allowed:
            raise CelebaFormatError(f"{name} line {number}: value must be one of {sorted(allowed)}, got {value}")
        if fields[0] in mapping:
            raise CelebaFormatError(f"{name} line {number}: image {fields[0]} is listed twice")
        mapping[fields[0]] = value
    return mapping


def _aligned(mapping: dict[str, int], ids: list[str], name: str, dtype) -> np.ndarray:
    missing = [i for i in ids if i not in mapping]
    if missing:
        raise CelebaFormatError(f"{name}: no entry for image {missing[0]} ({len(missing)} image(s) missing)")
    return np.asarray([mapping[i] for i in ids], dtype=dtype)


def read_celeba(root: str, check_images: bool = True) -> CelebaIndex:
    """Read a CelebA folder (local or ``s3://``) and check that every listed image file exists."""
    ids, attributes = parse_attributes(_lines(root, ATTR_FILE), storage.join(root, ATTR_FILE))
    partition = identity = None
    lines = _lines(root, PARTITION_FILE, required=False)
    if lines is not None:
        name = storage.join(root, PARTITION_FILE)
        partition = _aligned(parse_mapping(lines, name, set(SPLITS.values())), ids, name, np.int8)
    lines = _lines(root, IDENTITY_FILE, required=False)
    if lines is not None:
        name = storage.join(root, IDENTITY_FILE)
        identity = _aligned(parse_mapping(lines, name), ids, name, np.int32)
    if check_images:
        # One listing instead of one request per image: cheap on S3 with 200k images.
        present = set(storage.list_names(storage.join(root, IMAGE_DIR)))
        for number, image_id in enumerate(ids, start=3):
            if image_id not in present:
                raise CelebaFormatError(
                    f"{storage.join(root, IMAGE_DIR, image_id)}: image listed in {ATTR_FILE} line {number} not found")
    return CelebaIndex(root=str(root), image_ids=ids, attributes=attributes, partition=partition, identity=identity)


def official_split(index: CelebaIndex) -> np.ndarray:
    """Split from ``list_eval_partition.txt``: int8 [N] of 0 train / 1 val / 2 test."""
    if index.partition is None:
        raise CelebaFormatError(f"{storage.join(index.root, PARTITION_FILE)}: needed by the 'official' split recipe")
    return index.partition.copy()


def balanced_split(index: CelebaIndex, per_class: int, test_per_class: int, val_fraction: float = 0.2,
                   seed: int = 0) -> np.ndarray:
    """The seed study's recipe, as an int8 [N] of 0 train / 1 val / 2 test / -1 unused.

    The first ``per_class`` male and first ``per_class`` female images (attribute-list order) are split
    ``1 - val_fraction`` / ``val_fraction`` into train/val per class with a seeded shuffle; the last
    ``test_per_class`` of each class form a balanced test set, disjoint from train/val.
    """
    split = np.full(len(index.image_ids), -1, dtype=np.int8)
    rng = np.random.default_rng(seed)
    for label in (1, 0):
        rows = np.flatnonzero(index.male == label)
        if per_class + test_per_class > len(rows):
            name = "male" if label else "female"
            raise SplitError(f"balanced split: needs {per_class} + {test_per_class} {name} images, "
                             f"the data set has {len(rows)}")
        chosen = rows[:per_class]
        n_val = int(round(per_class * val_fraction))
        shuffled = rng.permutation(chosen)
        split[shuffled[n_val:]] = SPLITS["train"]
        split[shuffled[:n_val]] = SPLITS["val"]
        if test_per_class:
            split[rows[-test_per_class:]] = SPLITS["test"]
    return split


def selection_split(index: CelebaIndex, select_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """Model selection on identities of its own, as an int8 [N] of 0 train / 1 val / 2 test / -1 unused.

    A seeded ``select_fraction`` of the official train split's identities becomes the ``val`` split: what early
    stopping, checkpoint ranking and Tune's metric choose on. The official val and test images become ``test``:
    only reported, never chosen on. All three are identity-disjoint: a train image whose identity also appears in
    the official val or test is left out (-1).
    """
    if index.identity is None:
        raise CelebaFormatError(f"{storage.join(index.root, IDENTITY_FILE)}: needed by the 'selection' split recipe")
    if not 0 < select_fraction < 1:
        raise SplitError(f"selection split: select_fraction must be in (0, 1), got {select_fraction}")
    official = official_split(index)
    train = official == SPLITS["train"]
    reported = (official == SPLITS["val"]) | (official == SPLITS["test"])
    identities = np.unique(index.identity[train])
    count = int(round(len(identities) * select_fraction))
    if count < 1 or count >= len(identities):
        raise SplitError(f"selection split: {len(identities)} train identities cannot give {select_fraction:.0%} "
                         "to selection and keep some for training")
    chosen = np.random.default_rng(seed).permutation(identities)[:count]
    split = np.full(len(index.image_ids), -1, dtype=np.int8)
    split[train] = SPLITS["train"]
    split[train & np.isin(index.identity, chosen)] = SPLITS["val"]
    split[reported] = SPLITS["test"]
    split[train & np.isin(index.identity, index.identity[reported])] = -1
    return split
