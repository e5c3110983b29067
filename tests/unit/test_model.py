import urllib.error

import pytest
import torch

from genderid.config import ModelConfig
from genderid.model import NUM_BLOCKS, GenderNet, WeightsUnavailableError, build_model, load_backbone_weights


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

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone_weights(GenderNet(width=1.0), "imagenet")
    message = str(info.value)
    assert str(tmp_path) in message and "vgg16-397923af.pth" in message and "model.weights" in message
