"""Photo corruptions of the robustness report: deterministic, size and mode kept, severity 0 the identity."""
import numpy as np
import pytest
from PIL import Image

from genderid import corruptions
from genderid.corruptions import CORRUPTIONS, MAX_SEVERITY, corrupt


def photo(width=90, height=110, seed=0):
    """A face-sized test image with structure at several scales (edges, gradients, texture)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([120 + 80 * np.sin(x / 7.0), 100 + 90 * np.cos(y / 11.0), 60 + (x + y) % 64 * 2], axis=-1)
    base[30:80, 25:65] = [200, 170, 150]  # a block with sharp edges
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8), "RGB")


def difference(a, b):
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.mark.parametrize("name", [c.name for c in CORRUPTIONS])
def test_each_corruption_is_deterministic_keeps_size_and_mode_and_grows_with_severity(name):
    img = photo()
    assert corrupt(img, name, 0, "000001.jpg") is img  # severity 0: the image itself
    changes = []
    for severity in range(1, MAX_SEVERITY + 1):
        out = corrupt(img, name, severity, "000001.jpg")
        again = corrupt(img, name, severity, "000001.jpg")
        assert out.size == img.size and out.mode == "RGB" and np.asarray(out).dtype == np.uint8
        assert np.array_equal(np.asarray(out), np.asarray(again))  # the same image id: the same result
        changes.append(difference(out, img))
    assert changes[0] > 0.5, changes  # severity 1 does something
    assert changes == sorted(changes) and changes[-1] > changes[0], changes  # and more with severity
    assert np.array_equal(np.asarray(img), np.asarray(photo()))  # the input is not modified


def test_random_corruptions_differ_between_images_but_not_between_runs():
    img = photo()
    noise_a = corrupt(img, "gaussian_noise", 2, "a.jpg")
    noise_b = corrupt(img, "gaussian_noise", 2, "b.jpg")
    assert not np.array_equal(np.asarray(noise_a), np.asarray(noise_b))
    assert corruptions.seed_for("a.jpg", "shift", 1) == corruptions.seed_for("a.jpg", "shift", 1)
    assert corruptions.seed_for("a.jpg", "shift", 1) != corruptions.seed_for("a.jpg", "shift", 2)


def test_unknown_corruption_or_severity_is_refused():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(photo(), "fog", 1)
    with pytest.raises(ValueError, match="severity must be 0-3"):
        corrupt(photo(), "jpeg", 4)


def jpeg_bytes(img):
    import io

    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_one_pass_scores_every_corruption_and_severity_and_the_report_shows_them(tmp_path):
    import torch

    from genderid import robustness
    from genderid.batches import corrupted_batch
    from genderid.model_card import model_card
    from genderid.preprocess import Preprocessing
    from genderid.report import write_report

    columns = {"image": [jpeg_bytes(photo(seed=s)) for s in range(3)], "male": np.array([1, 0, 1]),
               "image_id": np.array(["a.jpg", "b.jpg", "c.jpg"])}
    prep = Preprocessing(image_size=(48, 40))
    batch = corrupted_batch(columns, prep)
    per_row = len(CORRUPTIONS) * MAX_SEVERITY
    assert batch["image"].shape == (3 * per_row, 3, 48, 40) and batch["image"].dtype == np.float32
    assert batch["male"].tolist() == [1] * per_row + [0] * per_row + [1] * per_row
    assert sorted(set(zip(batch["corruption"].tolist(), batch["severity"].tolist()))) == [
        (c, s) for c in range(len(CORRUPTIONS)) for s in range(1, MAX_SEVERITY + 1)]
    # Each image is the full-size photo, corrupted with its own id's seed, then the model's preprocessing.
    from genderid.preprocess import open_image

    noise = [c.name for c in CORRUPTIONS].index("gaussian_noise")
    second = batch["image"][(batch["corruption"] == noise) & (batch["severity"] == 2)][1]  # row b.jpg
    assert np.array_equal(second, prep(corrupt(open_image(columns["image"][1]), "gaussian_noise", 2, "b.jpg")))
    clean = prep(columns["image"][0])

    class SaysMaleWhenBright(torch.nn.Module):  # a stand-in model: "male" where the image is bright enough
        def forward(self, x):
            bright = x.mean(dim=(1, 2, 3)) > float(torch.from_numpy(clean).mean()) - 0.5
            return torch.stack([(~bright).float(), bright.float()], dim=1)

    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    counts = robustness.score(SaysMaleWhenBright(), [{k: v[i:i + 16] for k, v in tensors.items()}
                                                     for i in range(0, len(batch["male"]), 16)])
    assert counts.sum() == 3 * per_row and counts[:, :, :, :].sum(axis=(2, 3)).tolist() == [[3] * 3] * 9
    block = robustness.report(counts, {"accuracy": 2 / 3, "balanced_accuracy": 0.75})
    darkest = block["corruptions"]["brightness"]["accuracy"]
    assert darkest[-1] <= darkest[0] and block["worst"][0]["accuracy_drop_points"] >= 0
    assert [w["corruption"] for w in block["worst"]][:1] and len(block["mean_accuracy_by_severity"]) == 3
    report = {"split": "val", "count": 3, "accuracy": 2 / 3, "confusion_matrix": [[0, 1], [0, 2]],
              "robustness": block}
    files = write_report(tmp_path, report, ["female", "male"])
    assert "robustness.png" in files and (tmp_path / "robustness.png").stat().st_size > 1000
    card = model_card({**report, "calibration": {}, "model": {}, "dataset": {}})
    assert "## Robustness" in card and "| brightness | brightness factor: 0.6, 0.4, 0.25 |" in card
