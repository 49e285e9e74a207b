"""PyTorch eager mirror of the urnet_jax networks, used only as the reference of `bench/train_step.py`.

The mirror is the *same* network as the JAX one, layer by layer: every enhancer is built from the
JAX module's own fields (`torch_enhancer_like(jax_module)`), submodules carry the JAX names (so
`port_enhancer_params` maps every JAX variable to exactly one torch tensor), and the classifier is
torchvision's. `TorchEnhanceClassify` mirrors `urnet_jax.models.composite.EnhanceClassify`:
image in [0, 1] -> enhancer -> ImageNet normalisation -> classifier -> logits.

Layouts: torch tensors are NCHW (optionally channels_last in memory); JAX arrays are NHWC.
Weight layouts: conv kernel HWIO -> OIHW; dense (in, out) -> (out, in); 2x2 transposed conv
(2, 2, C_in, C_out) -> (C_in, C_out, 2, 2); BatchNorm scale/bias/mean/var -> weight/bias/running_*.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _activation(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    return F.relu(x) if negative_slope == 0.0 else F.leaky_relu(x, negative_slope)


class ConvNormAct(nn.Module):
    """Mirror of `enhancer_blocks.ConvNormAct`: conv -> BatchNorm2d (norm='batch') -> activation."""

    def __init__(self, in_channels: int, features: int, kernel_size: int, stride: int, padding: int,
                 norm: str, activate: bool, negative_slope: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, features, kernel_size, stride, padding, bias=norm == "none")
        self.norm = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1) if norm == "batch" else None
        self.activate, self.negative_slope = activate, negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return _activation(x, self.negative_slope) if self.activate else x


class ConvBlock(nn.Module):
    """Mirror of `enhancer_blocks.ConvBlock`: two 3x3 ConvNormAct, optionally residual."""

    def __init__(self, in_channels: int, features: int, residual: bool, norm: str, negative_slope: float):
        super().__init__()
        self.residual, self.negative_slope = residual, negative_slope
        self.conv1 = ConvNormAct(in_channels, features, 3, 1, 1, norm, True, negative_slope)
        self.conv2 = ConvNormAct(features, features, 3, 1, 1, norm, not residual, negative_slope)
        self.shortcut = (ConvNormAct(in_channels, features, 1, 1, 0, norm, False, negative_slope)
                         if residual and in_channels != features else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        if not self.residual:
            return y
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return _activation(y + shortcut, self.negative_slope)


class SqueezeExcitation(nn.Module):
    """Mirror of `se.SqueezeExcitation`: x * sigmoid(fc2(relu(fc1(mean_HW(x))))),
    hidden = max(min_hidden, channels // reduction)."""

    def __init__(self, channels: int, reduction: int, min_hidden: int):
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


def _match_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mirror of `enhancer_blocks.match_size`: crop or zero-pad at the bottom/right."""
    x = x[:, :, :height, :width]
    pad_h, pad_w = height - x.shape[2], width - x.shape[3]
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def _output_activation(head: torch.Tensor, image: torch.Tensor, kind: str) -> torch.Tensor:
    head = head.float()
    if kind == "sigmoid":
        return torch.sigmoid(head)
    if kind == "clip":
        return head.clamp(0.0, 1.0)
    return (image.float() + head).clamp(0.0, 1.0)


class UShapedEnhancer(nn.Module):
    """Mirror of `enhancer_blocks.UShapedEnhancer` (UNet, ResUNet, UR-Net), same submodule names."""

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 4, norm: str = "batch",
                 output_activation: str = "sigmoid", residual_blocks: bool = False,
                 downsampling: str = "max_pool", leaky_slope: float = 0.0, skip_conv: bool = False,
                 se_ratio: int = 0, se_min_hidden: int = 4):
        super().__init__()
        self.depth, self.output_activation = depth, output_activation
        self.downsampling, self.skip_conv, self.se_ratio = downsampling, skip_conv, se_ratio

        def channels(level: int) -> int:
            return width * 2**level

        def block(cin: int, level: int) -> ConvBlock:
            return ConvBlock(cin, channels(level), residual_blocks, norm, leaky_slope)

        self.add_module("down0_block", block(in_channels, 0))
        for level in range(1, depth + 1):
            if downsampling == "max_pool":
                self.add_module(f"down{level}_pool", nn.MaxPool2d(2, 2))
            else:
                self.add_module(f"down{level}_strided_conv",
                                ConvNormAct(channels(level - 1), channels(level - 1), 3, 2, 1, norm, True,
                                            leaky_slope))
            self.add_module(f"down{level}_block", block(channels(level - 1), level))
        for level in reversed(range(depth)):
            if se_ratio > 0:
                self.add_module(f"up{level}_se", SqueezeExcitation(channels(level + 1), se_ratio, se_min_hidden))
            self.add_module(f"up{level}_transpose", nn.ConvTranspose2d(channels(level + 1), channels(level), 2, 2))
            if skip_conv:
                self.add_module(f"skip{level}_1x1", nn.Conv2d(channels(level), channels(level), 1))
            self.add_module(f"up{level}_block", block(2 * channels(level), level))
        self.head = nn.Conv2d(width, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1], float32."""
        h = self.down0_block(x)
        skips = []
        for level in range(1, self.depth + 1):
            skips.append(h)
            down = f"down{level}_pool" if self.downsampling == "max_pool" else f"down{level}_strided_conv"
            h = self.get_submodule(f"down{level}_block")(self.get_submodule(down)(h))
        for level in reversed(range(self.depth)):
            skip = skips[level]
            if self.se_ratio > 0:
                h = self.get_submodule(f"up{level}_se")(h)
            h = _match_size(self.get_submodule(f"up{level}_transpose")(h), skip.shape[2], skip.shape[3])
            if self.skip_conv:
                skip = self.get_submodule(f"skip{level}_1x1")(skip)
            h = self.get_submodule(f"up{level}_block")(torch.cat([skip, h], dim=1))
        return _output_activation(self.head(h), x, self.output_activation)


class UNetPlusPlus(nn.Module):
    """Mirror of `unetpp.UNetPlusPlus` (nested dense skips, no deep supervision), same submodule names."""

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 4, norm: str = "batch",
                 output_activation: str = "sigmoid", leaky_slope: float = 0.0):
        super().__init__()
        self.depth, self.output_activation = depth, output_activation

        def channels(level: int) -> int:
            return width * 2**level

        for i in range(depth + 1):
            if i > 0:
                self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
            cin = in_channels if i == 0 else channels(i - 1)
            self.add_module(f"x{i}_0", ConvBlock(cin, channels(i), False, norm, leaky_slope))
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.add_module(f"x{i}_{j}_up", nn.ConvTranspose2d(channels(i + 1), channels(i), 2, 2))
                self.add_module(f"x{i}_{j}", ConvBlock((j + 1) * channels(i), channels(i), False, norm, leaky_slope))
        self.head = nn.Conv2d(width, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1], float32."""
        nodes: dict[tuple[int, int], torch.Tensor] = {}
        h = x
        for i in range(self.depth + 1):
            if i > 0:
                h = self.get_submodule(f"pool{i}")(h)
            h = nodes[i, 0] = self.get_submodule(f"x{i}_0")(h)
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                same_level = [nodes[i, k] for k in range(j)]
                up = self.get_submodule(f"x{i}_{j}_up")(nodes[i + 1, j - 1])
                up = _match_size(up, same_level[0].shape[2], same_level[0].shape[3])
                nodes[i, j] = self.get_submodule(f"x{i}_{j}")(torch.cat([*same_level, up], dim=1))
        return _output_activation(self.head(nodes[0, self.depth]), x, self.output_activation)


_USHAPED_FIELDS = ("width", "depth", "norm", "output_activation", "residual_blocks", "downsampling",
                   "leaky_slope", "skip_conv", "se_ratio")
_UNETPP_FIELDS = ("width", "depth", "norm", "output_activation", "leaky_slope")


def torch_enhancer_like(jax_enhancer: Any, in_channels: int = 3) -> nn.Module:
    """The torch mirror of a JAX enhancer module, built from that module's own fields.

    Raises ValueError for an enhancer class without a mirror.
    """
    from urnet_jax.models.enhancer_blocks import UShapedEnhancer as JaxUShaped
    from urnet_jax.models.se import SqueezeExcitation as JaxSqueezeExcitation
    from urnet_jax.models.unetpp import UNetPlusPlus as JaxUNetPlusPlus

    if isinstance(jax_enhancer, JaxUShaped):
        # UShapedEnhancer builds its SE blocks with SqueezeExcitation's default min_hidden.
        se_min_hidden = JaxSqueezeExcitation.__dataclass_fields__["min_hidden"].default
        return UShapedEnhancer(in_channels, se_min_hidden=se_min_hidden,
                               **{f: getattr(jax_enhancer, f) for f in _USHAPED_FIELDS})
    if isinstance(jax_enhancer, JaxUNetPlusPlus):
        return UNetPlusPlus(in_channels, **{f: getattr(jax_enhancer, f) for f in _UNETPP_FIELDS})
    raise ValueError(f"no torch mirror for enhancer {type(jax_enhancer).__name__}")


def torch_classifier(name: str, num_classes: int) -> nn.Module:
    """torchvision's classifier `name` (e.g. 'resnet18') with a fresh `num_classes` head."""
    if not hasattr(torchvision.models, name):
        raise ValueError(f"torchvision has no model {name!r}")
    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


class TorchEnhanceClassify(nn.Module):
    """Mirror of `composite.EnhanceClassify`: (N, 3, H, W) in [0, 1] -> logits (N, num_classes)."""

    def __init__(self, enhancer: nn.Module | None, classifier: nn.Module):
        super().__init__()
        self.enhancer, self.classifier = enhancer, classifier
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.enhancer is None else self.enhancer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier((self.enhance(x) - self.mean) / self.std)


def torch_model_like(jax_model: Any, classifier_name: str, num_classes: int) -> TorchEnhanceClassify:
    """The torch mirror of a JAX `EnhanceClassify` whose classifier is torchvision's `classifier_name`."""
    enhancer = None if jax_model.enhancer is None else torch_enhancer_like(jax_model.enhancer)
    return TorchEnhanceClassify(enhancer, torch_classifier(classifier_name, num_classes))


# Names of the `UpConv2x2` submodules: 'up{l}_transpose' (UShapedEnhancer), 'x{i}_{j}_up' (UNet++).
_TRANSPOSED_CONV_SUFFIXES = ("_transpose", "_up")
_JAX_TO_TORCH_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
                      "var": "running_var"}


def _torch_axes(jax_path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
    """The transpose taking the JAX variable at `jax_path` to its torch layout (None: same layout)."""
    leaf, module = jax_path[-1], jax_path[-2] if len(jax_path) > 1 else ""
    if leaf == "kernel" and ndim == 4:
        if module.endswith(_TRANSPOSED_CONV_SUFFIXES):
            return (2, 3, 0, 1)  # (2, 2, C_in, C_out) -> (C_in, C_out, 2, 2)
        return (3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and ndim == 2:
        return (1, 0)  # (in, out) -> (out, in)
    return None


def _enhancer_leaves(variables: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...], Any]]:
    """(collection, path, value) of every variable of a JAX enhancer's {'params', 'batch_stats'}."""
    leaves = []

    def visit(tree: Mapping[str, Any], collection: str, path: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                visit(value, collection, (*path, key))
            else:
                leaves.append((collection, (*path, key), value))

    for collection in ("params", "batch_stats"):
        visit(variables.get(collection, {}), collection, ())
    return leaves


def _torch_key(path: tuple[str, ...]) -> str:
    return ".".join((*path[:-1], _JAX_TO_TORCH_LEAF[path[-1]]))


def port_enhancer_params(variables: Mapping[str, Any], torch_enhancer: nn.Module) -> None:
    """Copies a JAX enhancer's {'params', 'batch_stats'} into its torch mirror, in place.

    Every JAX variable must map to a torch tensor of the converted shape and every torch parameter
    and running statistic must be written; raises ValueError otherwise (so a mismatch in the
    architecture cannot go unnoticed).
    """
    state = torch_enhancer.state_dict()
    expected = {k for k in state if not k.endswith("num_batches_tracked")}
    written: set[str] = set()
    for _, path, value in _enhancer_leaves(variables):
        key = _torch_key(path)
        if key not in state:
            raise ValueError(f"JAX variable {'/'.join(path)} has no torch counterpart {key}")
        array = np.asarray(value, np.float32)
        axes = _torch_axes(path, array.ndim)
        converted = array if axes is None else array.transpose(axes)
        if tuple(converted.shape) != tuple(state[key].shape):
            raise ValueError(f"{key}: JAX shape {converted.shape} != torch shape {tuple(state[key].shape)}")
        state[key] = torch.tensor(converted)
        written.add(key)
    if written != expected:
        raise ValueError(f"torch enhancer tensors not written from JAX: {sorted(expected - written)}")
    torch_enhancer.load_state_dict(state)


def enhancer_variables_from_torch(tensors: Mapping[str, torch.Tensor], template: Mapping[str, Any]) -> dict:
    """The inverse of `port_enhancer_params`: torch tensors keyed like the mirror's state_dict -> a
    {'params', 'batch_stats'} tree shaped like the JAX enhancer's `template` (numpy float32)."""
    result: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for collection, path, _ in _enhancer_leaves(template):
        array = tensors[_torch_key(path)].detach().float().cpu().numpy()
        axes = _torch_axes(path, array.ndim)
        node = result[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array if axes is None else array.transpose(np.argsort(axes))
    return result


def jax_layout_variables(tensors: Mapping[str, torch.Tensor], jax_variables: Mapping[str, Any],
                         classifier_name: str, num_classes: int) -> dict:
    """Tensors keyed like `TorchEnhanceClassify.state_dict()` -> the JAX model's variables layout.

    `jax_variables` (the JAX model's {'params', 'batch_stats'}) gives the enhancer's structure; the
    classifier goes through `urnet_jax.port.from_torchvision`.
    """
    from urnet_jax import port

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    classifier = port.from_torchvision(classifier_name, part("classifier."), num_classes)
    result = {"params": {"classifier": classifier["params"]},
              "batch_stats": {"classifier": classifier["batch_stats"]}}
    if "enhancer" in jax_variables["params"]:
        template = {c: jax_variables[c].get("enhancer", {}) for c in ("params", "batch_stats")}
        enhancer = enhancer_variables_from_torch(part("enhancer."), template)
        for collection in ("params", "batch_stats"):
            result[collection]["enhancer"] = enhancer[collection]
    return result


def share_initial_weights(jax_variables: Mapping[str, Any], torch_model: TorchEnhanceClassify,
                          classifier_name: str, num_classes: int) -> dict:
    """Makes both models start from the same weights and returns the JAX variables to use.

    The JAX enhancer's initial weights are copied into the torch mirror (in place); torchvision's
    initial classifier weights are ported to JAX (`urnet_jax.port.from_torchvision`).
    """
    if torch_model.enhancer is not None:
        port_enhancer_params({c: jax_variables[c].get("enhancer", {}) for c in ("params", "batch_stats")},
                             torch_model.enhancer)
    return jax_layout_variables(torch_model.state_dict(), jax_variables, classifier_name, num_classes)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars of a torch module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
