import urllib.error

import pytest
import torch
from torchvision.models import vgg16

from genderid.config import ModelConfig
from genderid.model import (NUM_BLOCKS, GenderNet, WeightsUnavailableError, build_model, flops_per_image,
                            load_backbone_weights, step_flops)


@pytest.mark.parametrize("depth", range(NUM_BLOCKS + 1))
def test_exactly_the_last_blocks_and_head_get_gradients(depth):
    model = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=depth)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for index in range(NUM_BLOCKS):
        grads = [p.grad is not None and p.grad.abs().sum() > 0 for p in model.block(index).parameters()]
        trains = index >= NUM_BLOCKS - depth
        assert all(grads) if trains else not any(grads), f"block {index + 1}, depth {depth}"
        assert all(p.requires_grad == trains for p in model.block(index).parameters())
    assert all(p.grad is not None for p in model.head.parameters() if p.requires_grad)


def test_frozen_blocks_keep_their_batchnorm_statistics():
    model = GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=1)
    model.train()
    frozen_bn = model.block(0)[1]
    trained_bn = model.block(4)[1]
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert not frozen_bn.training and torch.equal(frozen_bn.running_mean, before[0])
    assert trained_bn.training and not torch.equal(trained_bn.running_mean, before[1])


@pytest.mark.parametrize("height, width", [(218, 178), (224, 224), (64, 64)])
def test_forward_shapes(height, width):
    model = GenderNet(width=0.125, unfreeze_depth=1).eval()
    assert model(torch.randn(2, 3, height, width)).shape == (2, 2)


def test_real_width_is_torchvision_vgg16():
    from torchvision.models import vgg16

    model = GenderNet(width=1.0, unfreeze_depth=0).eval()
    reference = vgg16(weights=None).features.state_dict()
    assert {k: v.shape for k, v in model.features.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def counted_step_flops(model: GenderNet, inputs: torch.Tensor, backward: bool) -> float:
    """FLOPs per image of one step as torch's own counter sees the kernels that run."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train(backward)
    with FlopCounterMode(display=False) as counter:
        logits = model(inputs)
        if backward:
            logits.sum().backward()
    return counter.get_total_flops() / len(inputs)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_step_flops_are_what_torch_counts_with_and_without_the_frozen_prefix(depth, batch_norm):
    model = GenderNet(width=0.0625, batch_norm=batch_norm, unfreeze_depth=depth)
    images = torch.randn(3, 3, 48, 40)
    assert step_flops(model, (48, 40), backward=False) == flops_per_image(model, (48, 40))
    on_images = step_flops(model, (48, 40))
    assert on_images == counted_step_flops(model, images, backward=True)
    # The cache's input: the frozen prefix's outputs. A step on them skips that prefix's forward, and only that.
    with torch.no_grad():
        cached = model.eval().features[:model.block_bounds[model.frozen_blocks]](images)
    model.set_input_blocks(model.frozen_blocks)
    assert step_flops(model, (48, 40)) == counted_step_flops(model, cached, backward=True)
    assert step_flops(model, (48, 40), backward=False) == counted_step_flops(model, cached, backward=False)
    assert (step_flops(model, (48, 40)) < on_images) == (depth < NUM_BLOCKS)


def test_vgg16_forward_is_its_published_count_at_224():
    # torchvision's VGG16: 15.47 G multiply-adds, of which its classifier's three linear layers are 0.12 G; this head
    # adds a few thousand. FLOPs here are 2 x multiply-adds.
    assert 2 * 15.34e9 < flops_per_image(GenderNet(width=1.0), (224, 224)) < 2 * 15.36e9


def test_weights_from_a_file(tmp_path):
    source = GenderNet(width=0.25)
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in source.features.state_dict().items()}, path)
    model = build_model(ModelConfig(weights=str(path), width=0.25))
    for a, b in zip(model.features.state_dict().values(), source.features.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        build_model(ModelConfig(weights=str(path), width=0.125))
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.pth"), width=0.25))


def test_imagenet_offline_fails_at_once_saying_how_to_provide_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # what the loader calls when nothing is cached
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone_weights(GenderNet(width=1.0), "imagenet")
    message = str(info.value)
    assert str(tmp_path) in message and "vgg16-397923af.pth" in message and "model.weights" in message
    assert calls == [("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af")]  # the hash is checked


def test_a_wrong_file_in_the_imagenet_cache_is_refused_before_it_is_unpickled(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    torch.save(GenderNet(width=0.0625).state_dict(), cached)  # a loadable state dict, but not the published file
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("an unverified file was unpickled"))
    with pytest.raises(WeightsUnavailableError, match=r"does not match the published 397923af.*Delete the file"):
        load_backbone_weights(GenderNet(width=1.0), "imagenet")


def test_published_weights_with_the_right_hash_load_with_weights_only(tmp_path, monkeypatch):
    import hashlib

    from genderid.model import load_published_weights

    state = vgg16(weights=None).state_dict()
    staged = tmp_path / "staged.pth"
    torch.save(state, staged)
    prefix = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    cache = tmp_path / "cache"
    cache.mkdir()
    staged.rename(cache / f"vgg16-{prefix}.pth")
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_published_weights(f"https://example.invalid/models/vgg16-{prefix}.pth", str(cache))
    assert seen.get("weights_only") is True
    model = GenderNet(width=1.0)
    model.features.load_state_dict({k[len("features."):]: v for k, v in loaded.items() if k.startswith("features.")})
    assert torch.equal(model.features[0].weight, state["features.0.weight"])
