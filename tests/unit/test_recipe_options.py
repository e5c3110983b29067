"""The CPU recipe's training options: warm-up, label smoothing, weight averaging, jitter, mixup, random erasing."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from genderid import engine
from genderid.config import ConfigError, TrainConfig, load_config, named_config_path
from genderid.model import GenderNet
from genderid.preprocess import Preprocessing


def test_warmup_rises_linearly_then_follows_the_schedule_and_ends_near_zero():
    rate = lambda position: engine.scheduled_lr(1e-3, "cosine", 1 + position, 8, warmup_epochs=2)  # noqa: E731
    assert [rate(p) for p in (0.5, 1.0, 1.5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    assert rate(2.0) == pytest.approx(1e-3)  # the peak, where the warm-up hands over to the cosine
    assert rate(5.0) == pytest.approx(5e-4)  # half-way through the 6 cosine epochs
    assert rate(7.99) < 1e-6 and rate(0.0) > 0
    # Without a warm-up the curve is the one every recipe before it was trained with.
    assert [engine.scheduled_lr(1e-3, "cosine", e, 8) for e in range(1, 9)] == pytest.approx(
        [1e-3 * 0.5 * (1 + np.cos(np.pi * (e - 1) / 8)) for e in range(1, 9)])


def test_epoch_lr_curve_is_per_step_only_with_a_warmup():
    plain = TrainConfig(epochs=4, lr=1e-2, lr_schedule="cosine")
    start, per_step = engine.epoch_lr_curve(plain, 2, steps_per_epoch=10)
    assert per_step is None and start == pytest.approx(engine.scheduled_lr(1e-2, "cosine", 2, 4))
    warm = TrainConfig(epochs=4, lr=1e-2, lr_schedule="cosine", warmup_epochs=1)
    _, per_step = engine.epoch_lr_curve(warm, 1, steps_per_epoch=10)
    assert [per_step(s) for s in (0, 5, 10, 50)] == pytest.approx([1e-5, 5e-3, 1e-2, 1e-2])


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    male = rng.integers(0, 2, n)
    return (rng.normal(size=(n, 3, 32, 32)) + male[:, None, None, None]).astype(np.float32), male


def one_epoch(**options):
    torch.manual_seed(0)
    model = GenderNet(width=0.0625, batch_norm=True)
    optimizer = engine.make_optimizer(model, "sgd", 0.05)
    images, male = data()
    average = engine.weight_average(model, 0.5) if options.pop("average", False) else None
    stats = engine.train_one_epoch(model, engine.tensor_batches(images, male, 8), optimizer, average=average,
                                   **options)
    return model, average, optimizer, stats


def test_label_smoothing_trains_on_the_smoothed_loss():
    images, male = data()
    sharp, _, _, _ = one_epoch()
    smooth, _, _, stats = one_epoch(label_smoothing=0.2)
    assert not torch.equal(sharp.head[-1].weight, smooth.head[-1].weight)
    # The reported loss is the smoothed one: it is bounded below by the smoothed targets' entropy.
    floor = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    assert stats["loss"] > floor


def test_lr_at_step_sets_the_rate_before_every_step():
    rates = []
    model, _, optimizer, _ = one_epoch(lr_at_step=lambda step: rates.append(step) or 0.01 * (step + 1))
    assert rates == [0, 1, 2, 3] and optimizer.param_groups[0]["lr"] == pytest.approx(0.04)


def test_weight_average_is_the_exponential_average_of_every_step_weights_and_buffers():
    torch.manual_seed(0)
    model = GenderNet(width=0.0625, batch_norm=True)
    optimizer = engine.make_optimizer(model, "sgd", 0.05)
    images, male = data()
    average = engine.weight_average(model, 0.5)
    expected = None
    for n, batch in enumerate(engine.tensor_batches(images, male, 8)):
        engine.train_one_epoch(model, [batch], optimizer, average=average)
        state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        decay = min(0.5, (1 + n) / (10 + n))  # the warm-up rule, after n earlier updates
        expected = state if expected is None else {k: decay * expected[k] + (1 - decay) * state[k] for k in state}
    averaged = average.module.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(averaged[key].float(), value, atol=1e-6), key
    # It is not simply the last weights (4 steps at lr 0.05 move them).
    assert not torch.allclose(averaged["head.4.weight"], model.state_dict()["head.4.weight"])
    assert any("running_mean" in k for k in expected)  # BatchNorm statistics are averaged too
    with pytest.raises(ValueError, match="decay"):
        engine.weight_average(model, 1.0)


def test_weight_average_leaves_frozen_blocks_as_they_are():
    torch.manual_seed(0)
    model = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=1)
    frozen = copy.deepcopy(model.block(0).state_dict())
    average = engine.weight_average(model, 0.9)
    images, male = data()
    engine.train_one_epoch(model, engine.tensor_batches(images, male, 8), engine.make_optimizer(model, "sgd", 0.05),
                           average=average)
    for key, value in frozen.items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(average.module.block(0).state_dict()[key], value)


def photo(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(40, 200, (60, 50, 3), dtype=np.uint8))


def test_jitter_changes_train_images_only_and_zero_draws_nothing():
    plain, jittered = Preprocessing(image_size=(32, 32)), Preprocessing(image_size=(32, 32), jitter=0.4)
    image = photo()
    # Evaluation (no rng) is unaffected; jitter 0 leaves the random stream, and so old recipes' images, unchanged.
    assert np.array_equal(plain(image), jittered(image))
    a = plain(image, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    assert np.array_equal(a, Preprocessing(image_size=(32, 32), jitter=0.0)(image, rng))
    b = jittered(image, np.random.default_rng(3))
    assert not np.allclose(a, b)
    assert np.array_equal(b, jittered(image, np.random.default_rng(3)))  # deterministic per random stream
    assert b.shape == a.shape and b.dtype == np.float32
    # Values stay those of a valid image in [0, 1] before normalisation.
    mean, std = np.asarray(jittered.mean)[:, None, None], np.asarray(jittered.std)[:, None, None]
    raw = b * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # Over many draws brightness goes both ways.
    means = [jittered(image, np.random.default_rng(s)).mean() - a.mean() for s in range(20)]
    assert min(means) < 0 < max(means)


def test_jitter_in_checkpoints_and_configs_is_validated():
    with pytest.raises(ValueError, match="jitter"):
        Preprocessing(jitter=1.5).validate()
    old = Preprocessing(image_size=(32, 32)).to_dict()
    del old["jitter"]  # a checkpoint written before jitter existed
    assert Preprocessing.from_dict(old).jitter == 0.0
    config = load_config(named_config_path("tiny"), ["data.jitter=0.25"])
    assert Preprocessing.for_data(config.data).jitter == 0.25
    for override, key in (("data.jitter=1", "data.jitter"), ("train.label_smoothing=1", "train.label_smoothing"),
                          ("train.weight_average_decay=1.0", "train.weight_average_decay"),
                          ("train.warmup_epochs=3", "train.warmup_epochs"),
                          ("data.augment=false", "data.jitter.*needs data.augment")):
        with pytest.raises(ConfigError, match=key):
            load_config(named_config_path("tiny"), ["data.jitter=0.2", override])


def test_mixup_blends_each_batch_with_a_permutation_of_itself_and_repeats_with_its_seed():
    images = torch.randn(8, 3, 4, 4)
    mixed, partners, share = engine.mixup(0.4, [0, 1])(images)
    assert sorted(partners.tolist()) == list(range(8)) and 0 <= share <= 1
    assert torch.allclose(mixed, share * images + (1 - share) * images[partners])
    again, partners_again, share_again = engine.mixup(0.4, [0, 1])(images)
    assert share_again == share and torch.equal(partners_again, partners) and torch.equal(again, mixed)
    draws = [engine.mixup(0.4, [0, s])(images)[2] for s in range(20)]
    assert len(set(draws)) == 20  # a share per batch, not a constant


def test_mixup_trains_on_the_loss_of_both_label_sets():
    torch.manual_seed(0)
    model = GenderNet(width=0.0625, batch_norm=True)
    images, male = data()
    batch = next(engine.tensor_batches(images, male, 8))
    # The loss the step must report, from a copy of the model before the step and the same draws.
    before = copy.deepcopy(model).train()
    mixed, partners, share = engine.mixup(1.0, [7])(batch["image"])
    logits = before(mixed)
    loss_fn = torch.nn.CrossEntropyLoss()
    expected = share * loss_fn(logits, batch["male"]) + (1 - share) * loss_fn(logits, batch["male"][partners])
    assert batch["male"][partners].tolist() != batch["male"].tolist()  # both label sets matter in this batch
    stats = engine.train_one_epoch(model, [batch], engine.make_optimizer(model, "sgd", 0.05), mixup_alpha=1.0,
                                   mixup_seed=[7])
    assert stats["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    plain, _, _, _ = one_epoch()
    mixed_model, _, _, _ = one_epoch(mixup_alpha=0.2, mixup_seed=[0])
    assert not torch.equal(plain.head[-1].weight, mixed_model.head[-1].weight)
    assert engine.mixup_seed(0, 3, 1) != engine.mixup_seed(0, 3, 0) != engine.mixup_seed(0, 4, 0)


def check_train_only_augmentation(option: str) -> None:
    """``option`` (a chance per train image) leaves evaluation alone, draws nothing at 0 (old recipes' images are
    unchanged) and changes about half the train images at 0.5."""
    plain, image = Preprocessing(image_size=(32, 32)), photo()
    assert np.array_equal(plain(image), Preprocessing(image_size=(32, 32), **{option: 1.0})(image))
    assert np.array_equal(plain(image, np.random.default_rng(3)),
                          Preprocessing(image_size=(32, 32), **{option: 0.0})(image, np.random.default_rng(3)))
    half = Preprocessing(image_size=(32, 32), **{option: 0.5})
    changed = [not np.array_equal(half(image, np.random.default_rng(s)), plain(image, np.random.default_rng(s)))
               for s in range(200)]
    assert 0.35 < np.mean(changed) < 0.65


def test_erase_blanks_one_rectangle_of_train_images_only():
    check_train_only_augmentation("erase")
    plain, erasing = Preprocessing(image_size=(32, 32)), Preprocessing(image_size=(32, 32), erase=1.0)
    image = photo()
    a, b = plain(image, np.random.default_rng(3)), erasing(image, np.random.default_rng(3))
    assert b.shape == a.shape and b.dtype == np.float32
    assert np.array_equal(b, erasing(image, np.random.default_rng(3)))  # deterministic per random stream
    for seed in range(10):
        b = erasing(image, np.random.default_rng(seed))
        a = plain(image, np.random.default_rng(seed))
        changed = ~np.isclose(a, b).all(axis=0)
        rows, cols = np.nonzero(changed)
        # One rectangle, blanked to the mean colour (zero once normalised), of 2-20% of the image.
        box = np.zeros_like(changed)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert np.all(b[:, box] == 0)
        assert np.array_equal(a[:, ~box], b[:, ~box])
        assert 0.01 <= box.mean() <= 0.25


def test_blur_softens_train_images_only_keeping_their_colours():
    check_train_only_augmentation("blur")
    plain, softening = Preprocessing(image_size=(32, 32)), Preprocessing(image_size=(32, 32), blur=1.0)
    image = photo()

    def detail(array):  # mean absolute difference between horizontal neighbours
        return float(np.abs(np.diff(array, axis=2)).mean())

    kept = []
    for seed in range(20):
        a, b = plain(image, np.random.default_rng(seed)), softening(image, np.random.default_rng(seed))
        assert b.shape == a.shape and b.dtype == np.float32
        assert np.array_equal(b, softening(image, np.random.default_rng(seed)))  # deterministic per random stream
        assert detail(b) < detail(a)  # blurred or lower resolution: less pixel-to-pixel detail
        kept.append(detail(b) / detail(a))
        assert np.allclose(b.mean(axis=(1, 2)), a.mean(axis=(1, 2)), atol=0.05)  # the same colours
    assert np.mean(kept) < 0.7  # (the mildest blur, 0.5% of 32 pixels, barely changes an image)


def test_blur_is_validated_in_configs_and_checkpoints():
    with pytest.raises(ValueError, match="blur"):
        Preprocessing(blur=-0.1).validate()
    old = Preprocessing(image_size=(32, 32)).to_dict()
    del old["blur"]  # a checkpoint written before softening existed
    assert Preprocessing.from_dict(old).blur == 0.0
    config = load_config(named_config_path("tiny"), ["data.blur=0.3"])
    assert Preprocessing.for_data(config.data).blur == 0.3
    for override, key in (("data.blur=1.5", "data.blur"), ("data.augment=false", "data.blur.*needs data.augment")):
        with pytest.raises(ConfigError, match=key):
            load_config(named_config_path("tiny"), ["data.blur=0.2", override])


def test_mixup_and_erase_are_validated_in_configs_and_checkpoints():
    with pytest.raises(ValueError, match="erase"):
        Preprocessing(erase=1.5).validate()
    old = Preprocessing(image_size=(32, 32)).to_dict()
    del old["erase"]  # a checkpoint written before erasing existed
    assert Preprocessing.from_dict(old).erase == 0.0
    config = load_config(named_config_path("tiny"), ["data.erase=0.25", "train.mixup=0.2"])
    assert Preprocessing.for_data(config.data).erase == 0.25 and config.train.mixup == 0.2
    for override, key in (("data.erase=1.5", "data.erase"), ("train.mixup=-1", "train.mixup"),
                          ("data.augment=false", "data.erase.*needs data.augment")):
        with pytest.raises(ConfigError, match=key):
            load_config(named_config_path("tiny"), ["data.erase=0.2", override])
