"""VGG16 with the seed study's head, a width multiplier and an unfreeze depth. Pure PyTorch.

The backbone is torchvision's VGG16 feature stack (``make_layers`` with configuration "D"), so a width-1.0
model's ``features.*`` keys are exactly torchvision's and its ImageNet weights load unchanged. ``width`` scales
every layer's channels but keeps the five-block structure. Blocks that do not train run under ``no_grad`` and
stay in eval mode, so they cost no autograd memory and their BatchNorm statistics stay fixed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from typing import Optional

import torch
from torch import nn
from torchvision.models import VGG16_BN_Weights, VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers

from genderid.config import ModelConfig
from genderid.errors import UserError

LABELS = ("female", "male")  # class index 1 = CelebA's Male attribute
NUM_BLOCKS = 5


class WeightsUnavailableError(UserError, RuntimeError):
    """The requested pretrained weights cannot be found or downloaded."""


class GenderNet(nn.Module):
    """VGG16 features -> global average pool -> Linear(hidden) -> ReLU -> BatchNorm1d -> Linear(2).

    Built from a :class:`genderid.config.ModelConfig` (the one description of the model: a checkpoint stores it
    and rebuilds from it); keyword arguments override its fields, e.g. ``GenderNet(width=0.25)``.
    """

    def __init__(self, config: Optional[ModelConfig] = None, **fields):
        super().__init__()
        self.config = dataclasses.replace(config or ModelConfig(), **fields)
        self.config.validate()
        layout = [v if v == "M" else max(1, int(round(v * self.config.width))) for v in cfgs["D"]]
        self.features = make_layers(layout, batch_norm=self.config.batch_norm)
        # Index in `features` after each block's max-pool: blocks are features[bounds[i]:bounds[i+1]].
        pools = [i for i, layer in enumerate(self.features) if isinstance(layer, nn.MaxPool2d)]
        self.block_bounds = [0] + [p + 1 for p in pools]
        channels = [v for v in layout if v != "M"][-1]
        hidden = self.config.head_hidden
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden), nn.Dropout(self.config.dropout), nn.Linear(hidden, len(LABELS)),
        )
        self.input_blocks = 0  # conv blocks the input has already been through (see set_input_blocks)
        self.set_unfreeze_depth(self.config.unfreeze_depth)

    def block(self, index: int) -> nn.Sequential:
        """Conv block ``index`` (0-4) of the backbone."""
        return self.features[self.block_bounds[index]:self.block_bounds[index + 1]]

    @property
    def unfreeze_depth(self) -> int:
        return self.config.unfreeze_depth

    @property
    def frozen_blocks(self) -> int:
        return NUM_BLOCKS - self.unfreeze_depth

    def set_unfreeze_depth(self, depth: int) -> None:
        """Let the last ``depth`` conv blocks and the head train; freeze the rest."""
        if not 0 <= depth <= NUM_BLOCKS:
            raise ValueError(f"unfreeze_depth must be 0-{NUM_BLOCKS}, got {depth}")
        if NUM_BLOCKS - depth < self.input_blocks:
            raise ValueError(f"unfreeze_depth {depth} would train blocks that the input has already been through")
        self.config = dataclasses.replace(self.config, unfreeze_depth=depth)
        for index in range(NUM_BLOCKS):
            for param in self.block(index).parameters():
                param.requires_grad_(index >= self.frozen_blocks)
        self.train(self.training)

    def set_input_blocks(self, blocks: int) -> None:
        """Take as input the output of the first ``blocks`` conv blocks instead of an image.

        For training on a frozen prefix's cached outputs (:mod:`genderid.feature_cache`): those blocks must be
        frozen, so skipping them changes nothing but the time. Not part of the model's description: the weights
        (prefix included) and a checkpoint are those of the model that takes images.
        """
        if not 0 <= blocks <= self.frozen_blocks:
            raise ValueError(f"input_blocks must be 0-{self.frozen_blocks} (the frozen blocks), got {blocks}")
        self.input_blocks = blocks

    def train(self, mode: bool = True) -> "GenderNet":
        super().train(mode)
        for index in range(self.frozen_blocks):
            self.block(index).eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, split = self.block_bounds[self.input_blocks], self.block_bounds[self.frozen_blocks]
        if split > start:
            with torch.no_grad():
                x = self.features[start:split](x)
        x = self.features[split:](x)
        return self.head(x)


def _imagenet_state_dict(batch_norm: bool) -> dict[str, torch.Tensor]:
    weights = VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1
    return load_published_weights(weights.url, os.path.join(torch.hub.get_dir(), "checkpoints"))


def load_published_weights(url: str, cache_dir: str) -> dict[str, torch.Tensor]:
    """A published state dict, from ``cache_dir`` or downloaded there, checked and loaded safely.

    torchvision names its weight files ``<name>-<first hex digits of their SHA-256>.pth``; that prefix is checked
    before the file is read, and the file is loaded with ``weights_only=True`` (no pickled code runs). torchvision's
    own loader does neither unless asked.
    """
    filename = os.path.basename(url)
    match = re.search(r"-([0-9a-f]{8,64})\.", filename)
    if not match:
        raise WeightsUnavailableError(f"{url}: the file name carries no SHA-256 prefix to check it against")
    expected = match.group(1)
    cached = os.path.join(cache_dir, filename)
    if not os.path.isfile(cached):
        os.makedirs(cache_dir, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, cached, hash_prefix=expected, progress=False)
        except Exception as exc:  # offline: URLError / OSError; a bad download: RuntimeError from the hash check
            raise WeightsUnavailableError(
                f"ImageNet VGG16 weights are not cached at {cached} and could not be downloaded ({exc}). "
                f"Download {url} to that path on a machine with internet access, or set "
                f"model.weights to a local path or s3:// URI of that file.") from None
    with open(cached, "rb") as handle:
        data = handle.read()
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(expected):
        raise WeightsUnavailableError(
            f"{cached}: SHA-256 {digest[:len(expected)]}... does not match the published {expected} of {filename}; "
            "refusing to load it. Delete the file and download it again.")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"{cached}: not a loadable state dict ({exc})") from None


def _file_state_dict(location: str) -> dict[str, torch.Tensor]:
    from genderid import storage  # pyarrow: imported only when a file is named

    if not storage.exists(location):
        raise WeightsUnavailableError(f"model.weights: {location} does not exist")
    state = torch.load(io.BytesIO(storage.read_bytes(location)), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"model.weights: {location} does not hold a state dict")
    return state


def load_backbone_weights(model: GenderNet, weights: str) -> None:
    """Load ``features.*`` from ``imagenet``, a path or an ``s3://`` URI of a torchvision VGG16 state dict."""
    if weights == "none":
        return
    batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in model.features)
    state = _imagenet_state_dict(batch_norm) if weights == "imagenet" else _file_state_dict(weights)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    try:
        model.features.load_state_dict(features, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailableError(f"model.weights: {weights} does not fit this VGG16 layout: {exc}") from None


def build_model(model_config, load_weights: bool = True) -> GenderNet:
    """Build the model a :class:`genderid.config.ModelConfig` describes (pretrained weights included)."""
    model = GenderNet(model_config)
    if load_weights:
        load_backbone_weights(model, model_config.weights)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def layer_flops(model: GenderNet, image_size: tuple[int, int]) -> list[tuple[int, float]]:
    """``(block, FLOPs)`` of one image's forward pass through each convolution and linear layer, in order.

    FLOPs are 2 x multiply-adds; ``block`` is the conv block (0-4) a convolution belongs to, ``NUM_BLOCKS`` for the
    head's linear layers. Pooling, BatchNorm and activations are left out (a few percent of VGG16's work).
    """
    layers = []
    height, width = image_size
    for block in range(NUM_BLOCKS):
        for layer in model.block(block):
            if isinstance(layer, nn.Conv2d):
                layers.append((block, 2.0 * layer.in_channels * layer.out_channels * 9 * height * width))
            elif isinstance(layer, nn.MaxPool2d):
                height, width = height // 2, width // 2
    layers += [(NUM_BLOCKS, 2.0 * layer.in_features * layer.out_features)
               for layer in model.head if isinstance(layer, nn.Linear)]
    return layers


def flops_per_image(model: GenderNet, image_size: tuple[int, int]) -> float:
    """FLOPs (2 x multiply-adds) of one image's whole forward pass, convolutions and linear layers."""
    return sum(flops for _, flops in layer_flops(model, image_size))


def step_flops(model: GenderNet, image_size: tuple[int, int], backward: bool = True) -> float:
    """FLOPs per image of one step as the model now stands: the forward from where its input enters
    (:meth:`GenderNet.set_input_blocks`) and, with ``backward``, the backward through the layers that train.

    A trained layer's backward costs twice its forward (gradients of its weights and of its input), except the
    first one, whose input needs no gradient (an image, or a frozen block's output computed under ``no_grad``).
    This is the work a frozen-prefix cache can remove: the forward of the blocks before ``input_blocks``.
    """
    layers = [(block, flops) for block, flops in layer_flops(model, image_size) if block >= model.input_blocks]
    total = sum(flops for _, flops in layers)
    if backward:
        trained = [flops for block, flops in layers if block >= model.frozen_blocks]
        total += 2 * sum(trained) - trained[0]
    return total
