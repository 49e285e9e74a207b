"""Torch-exact building blocks shared by every model in the zoo.

Conventions (all modules of `urnet_jax.models`):
  * images are NHWC float arrays; convolution kernels are HWIO (Flax's layout);
  * padding is always explicit and symmetric, as in `torch.nn.Conv2d(padding=p)`, never 'SAME';
  * `dtype` is the computation dtype (e.g. bfloat16), parameters stay float32;
  * BatchNorm follows `torch.nn.BatchNorm2d` exactly (see `BatchNorm`); `GroupNorm` is the
    per-example alternative (`torch.nn.GroupNorm`), chosen with `norm_layer`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from urnet_jax.config import CONV_BACKENDS
from urnet_jax.errors import ConfigError
from urnet_jax.models import onednn

Array = jax.Array
Dtype = Any

# torchvision's ResNet/DenseNet/MobileNet conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_, a=sqrt(5)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Any:
    """torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as a Flax initializer."""
    bound = fan_in**-0.5

    def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


_conv_backend = CONV_BACKENDS[0]


def use_conv_backend(name: str) -> None:
    """Builds the convolutions of the models traced from now on in this process with backend `name`:
    'xla' (XLA's convolutions, the default) or 'onednn' (`onednn.conv`: oneDNN's CPU kernels for float32,
    the same values and gradients up to float rounding; it builds and loads oneDNN's library here, or raises
    `onednn.OnednnUnavailable` saying why not). The 'onednn' backend also computes the 2x2 transposed convs
    with oneDNN (`onednn.conv_transpose`) and max-pool's gradient with `max_pool_by_phase`: the CPU's fast
    path, whose gradients differ from XLA's in float rounding only. A module takes the backend of the moment
    it is built (in a model's compact `__call__`: when the model is traced); programs already traced keep
    theirs."""
    if name not in CONV_BACKENDS:
        raise ConfigError(f"conv_backend must be one of {', '.join(CONV_BACKENDS)}, got {name!r}")
    if name == "onednn":
        onednn.load()
    global _conv_backend
    _conv_backend = name


@contextlib.contextmanager
def conv_backend_scope(name: str) -> Iterator[None]:
    """`use_conv_backend(name)` for the models traced inside the block; the previous backend after it."""
    previous = _conv_backend
    use_conv_backend(name)
    try:
        yield
    finally:
        use_conv_backend(previous)


def conv_backend() -> str:
    """The backend of the convolutions traced now ('xla' or 'onednn')."""
    return _conv_backend


def conv(
    features: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    *,
    groups: int = 1,
    use_bias: bool = False,
    dtype: Dtype = None,
    kernel_init: Any = kaiming_fan_out,
    input_grad_by_phase: bool = False,
    name: str | None = None,
) -> nn.Conv:
    """A `torch.nn.Conv2d(kernel_size, stride, padding, groups, bias)` equivalent as a Flax `nn.Conv`.

    input_grad_by_phase: with stride > 1 (and groups == 1), compute the input's gradient with
    `strided_conv`'s backward pass (phase by phase) instead of XLA's; the same values and gradients.
    With the 'onednn' backend (`use_conv_backend`) every one-group conv is oneDNN's instead.
    """
    if _conv_backend == "onednn" and groups == 1:
        conv_general_dilated = onednn.conv_general_dilated
    elif input_grad_by_phase and stride > 1 and groups == 1:
        conv_general_dilated = _strided_conv_general_dilated
    else:
        conv_general_dilated = None  # Flax's default, lax.conv_general_dilated
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _lax_strided_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                        dimension_numbers=_NHWC_HWIO)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """conv2d of x (N, H, W, C_in) with kernel (kh, kw, C_in, C_out), stride and symmetric zero padding (ints),
    -> (N, H_out, W_out, C_out): `lax.conv_general_dilated`'s values and gradients, with the input's gradient
    written out phase by phase.

    XLA computes a strided conv's input gradient as a conv over the output's gradient dilated with
    stride - 1 zeros between its pixels, and on CPUs does not skip the zeros. Here the input pixels are
    split into stride x stride phases (the pixels (s*q + a, s*q' + b) of one phase (a, b) all see the
    output's gradient through the same kernel taps), each computed by a stride-1 conv over the undilated
    output gradient with only that phase's taps, and interleaved. The kernel's gradient is XLA's own.
    """
    return _lax_strided_conv(x, kernel, stride, padding)


def _strided_conv_forward(x: Array, kernel: Array, stride: int, padding: int) -> tuple[Array, tuple[Array, Array]]:
    return _lax_strided_conv(x, kernel, stride, padding), (x, kernel)


def _phase_taps(size: int, kernel_size: int, stride: int, padding: int, out_size: int, phase: int
                ) -> tuple[slice, tuple[int, int]] | None:
    """For one axis: the kernel taps that input positions s*q + phase see (a slice, in the order of the output
    positions q + d they meet, d ascending) and the (low, high) padding of the output's gradient (negative:
    cropped) that aligns them for q = 0 .. ceil(size / s) - 1; None when no tap reaches the phase."""
    taps = [t for t in range(kernel_size) if (phase + padding - t) % stride == 0]
    if not taps:
        return None
    offset_low = (phase + padding - taps[-1]) // stride  # the largest tap meets the lowest output offset
    offset_high = (phase + padding - taps[0]) // stride
    positions = -(-size // stride)
    return slice(taps[-1], None, -stride), (-offset_low, positions + offset_high - out_size)


def _strided_conv_backward(stride: int, padding: int, residuals: tuple[Array, Array], grad: Array
                           ) -> tuple[Array, Array]:
    x, kernel = residuals
    (n, height, width, in_channels), (kernel_h, kernel_w) = x.shape, kernel.shape[:2]
    rows, cols = -(-height // stride), -(-width // stride)
    zero = jnp.zeros((), grad.dtype)
    phase_rows = []
    for a in range(stride):
        phase_cols = []
        for b in range(stride):
            along_h = _phase_taps(height, kernel_h, stride, padding, grad.shape[1], a)
            along_w = _phase_taps(width, kernel_w, stride, padding, grad.shape[2], b)
            if along_h is None or along_w is None:
                phase_cols.append(jnp.zeros((n, rows, cols, in_channels), grad.dtype))
                continue
            taps = jnp.swapaxes(kernel[along_h[0], along_w[0]], 2, 3).astype(grad.dtype)  # (.., .., C_out, C_in)
            padded = jax.lax.pad(grad, zero, ((0, 0, 0), (*along_h[1], 0), (*along_w[1], 0), (0, 0, 0)))
            phase_cols.append(jax.lax.conv_general_dilated(padded, taps, (1, 1), "VALID",
                                                           dimension_numbers=_NHWC_HWIO))
        phase_rows.append(jnp.stack(phase_cols, axis=3))  # (N, rows, cols, stride, C_in)
    interleaved = jnp.stack(phase_rows, axis=2).reshape(n, rows * stride, cols * stride, in_channels)
    x_grad = interleaved[:, :height, :width].astype(x.dtype)
    _, kernel_pullback = jax.vjp(lambda k: _lax_strided_conv(x, k, stride, padding), kernel)
    (kernel_grad,) = kernel_pullback(grad)
    return x_grad, kernel_grad


strided_conv.defvjp(_strided_conv_forward, _strided_conv_backward)


def _strided_conv_general_dilated(lhs: Array, rhs: Array, window_strides: Any, padding: Any, **_: Any) -> Array:
    """`strided_conv` with `lax.conv_general_dilated`'s signature, for `nn.Conv(conv_general_dilated=...)`.
    `conv` passes it only for what `strided_conv` computes: equal strides, one symmetric padding, one group,
    no dilation, NHWC / HWIO (Flax's layout)."""
    return strided_conv(lhs, rhs, window_strides[0], padding[0][0])


@jax.custom_vjp
def channel_matmul(x: Array, kernel: Array) -> Array:
    """x @ kernel over the channel axis: (..., C_in) x (C_in, C_out) -> (..., C_out), in x's dtype.

    The same values and gradients as `jnp.dot`, with a backward pass written out: the kernel's gradient is
    one (C_in, M) x (M, C_out) contraction over the M = prod(...) positions of x and of the output's
    gradient as they lie in memory. From `jnp.dot`'s own gradient XLA's CPU compiler makes a transposed
    copy (C_out, M) of the output's gradient first, fused with whatever produced it; without those copies
    (the UR-Net decoder's 2x2 transposed convs) the train step of docs/BENCHMARKS.md takes about 8% less CPU.
    """
    return jnp.dot(x, kernel)


def _channel_matmul_forward(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return jnp.dot(x, kernel), (x, kernel)


def _channel_matmul_backward(residuals: tuple[Array, Array], grad: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    positions = x.size // x.shape[-1]
    x_grad = jnp.dot(grad, kernel.T).astype(x.dtype)
    kernel_grad = jax.lax.dot_general(x.reshape(positions, -1), grad.reshape(positions, -1),
                                      (((0,), (0,)), ((), ())))
    return x_grad, kernel_grad.astype(kernel.dtype)


channel_matmul.defvjp(_channel_matmul_forward, _channel_matmul_backward)


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm2d` semantics over the last (channel) axis.

    train=True normalises with the batch's biased variance and updates the running averages as torch
    does: running = momentum * running + (1 - momentum) * batch, with the *unbiased* batch variance
    (n / (n - 1)) for `var`. Flax's momentum 0.9 is torch's momentum 0.1. Statistics are computed in
    float32 whatever `dtype` is. Under `jax.jit` with a batch sharded over devices the statistics are
    those of the global batch (the mean is a global reduction).

    Variables: params `scale`, `bias`; batch_stats `mean`, `var` (all shape (C,), float32).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = None
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if train:
            reduce_axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axis=reduce_axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=reduce_axes)
            if not self.is_initializing():
                count = x.size // features
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        offset = bias - mean * multiplier
        dtype = self.dtype or x.dtype
        return x.astype(dtype) * multiplier.astype(dtype) + offset.astype(dtype)


def group_count(channels: int, num_groups: int) -> int:
    """The largest divisor of `channels` that is at most `num_groups` (so GroupNorm fits any width)."""
    return max(g for g in range(1, min(channels, num_groups) + 1) if channels % g == 0)


class GroupNorm(nn.Module):
    """`torch.nn.GroupNorm(groups, C, eps)` over the last (channel) axis, with `groups` =
    group_count(C, num_groups); called as `(x, train)` like `BatchNorm` (train is unused: the statistics
    are each example's own, so the model has no batch_stats). Statistics in float32 (biased variance).

    Variables: params `scale`, `bias` (shape (C,), float32).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        groups = group_count(features, self.num_groups)
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, features // groups)
        reduce_axes = (*range(1, x.ndim - 1), x.ndim)  # every axis but the batch and group axes
        mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=reduce_axes, keepdims=True)
        normalised = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        dtype = self.dtype or x.dtype
        return (normalised * scale + bias).astype(dtype)


NORMS = ("batch", "group")  # the normalisation layers a classifier can be built with


def check_norm(norm: str) -> None:
    """Raises ConfigError unless `norm` is one of NORMS."""
    if norm not in NORMS:
        raise ConfigError(f"unknown normalisation {norm!r}; choose from {', '.join(NORMS)}")


def norm_layer(norm: str, *, num_groups: int = 32, dtype: Dtype = None, name: str | None = None) -> nn.Module:
    """A `BatchNorm` (norm='batch') or a `GroupNorm` with up to `num_groups` groups (norm='group')."""
    check_norm(norm)
    if norm == "group":
        return GroupNorm(num_groups, dtype=dtype, name=name)
    return BatchNorm(dtype=dtype, name=name)


def max_pool(x: Array, kernel_size: int, stride: int, padding: int = 0) -> Array:
    """`torch.nn.MaxPool2d(kernel_size, stride, padding)` (floor mode; padding never wins the max).
    With the 'onednn' backend (`use_conv_backend`) its gradient is `max_pool_by_phase`'s."""
    if _conv_backend == "onednn":
        return max_pool_by_phase(x, kernel_size, stride, padding)
    return _lax_max_pool(x, kernel_size, stride, padding)


def _lax_max_pool(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
    return nn.max_pool(
        x, (kernel_size, kernel_size), (stride, stride), ((padding, padding), (padding, padding))
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_by_phase(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
    """`max_pool` of x (N, H, W, C) -> (N, OH, OW, C) with the same values and gradients (a window's gradient
    goes to its first maximum in row-major order, as in XLA and torch), the input's gradient written out
    phase by phase.

    XLA's CPU compiler lowers max-pool's gradient (a select-and-scatter) to a reduce-window over four index
    arrays as large as the padded input, then a scatter: more than ten times the time of this backward pass,
    which finds each window's first maximum with `kernel_size`**2 strided comparisons and adds the routed
    gradients into the stride**2 phases of the input's gradient (shifted copies, no scatter).
    """
    return _lax_max_pool(x, kernel_size, stride, padding)


def _max_pool_by_phase_forward(x: Array, kernel_size: int, stride: int, padding: int
                               ) -> tuple[Array, tuple[Array, Array]]:
    y = _lax_max_pool(x, kernel_size, stride, padding)
    return y, (x, y)


def _max_pool_by_phase_backward(kernel_size: int, stride: int, padding: int, residuals: tuple[Array, Array],
                                grad: Array) -> tuple[Array]:
    x, y = residuals
    batch, height, width, channels = x.shape
    out_h, out_w = y.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    zero = jnp.zeros((), grad.dtype)
    # The gradient of each output routed to window offset (a, b) (input pixel (stride * i + a, stride * j + b)
    # of the padded input), where that offset holds the window's first maximum.
    routed, taken = {}, jnp.zeros(y.shape, bool)
    for a in range(kernel_size):
        for b in range(kernel_size):
            window = jax.lax.slice(padded, (0, a, b, 0),
                                   (batch, a + (out_h - 1) * stride + 1, b + (out_w - 1) * stride + 1, channels),
                                   (1, stride, stride, 1))
            first = (window == y) & ~taken
            taken = taken | first
            routed[a, b] = jnp.where(first, grad, zero)
    # Padded row stride * i + a lies in row phase a % stride, at row i + a // stride of that phase.
    rows, cols = -(-padded.shape[1] // stride), -(-padded.shape[2] // stride)
    row_phases = []
    for row_phase in range(stride):
        phases = []
        for col_phase in range(stride):
            shifted = [jax.lax.pad(part, zero, ((0, 0, 0), (a // stride, rows - out_h - a // stride, 0),
                                                (b // stride, cols - out_w - b // stride, 0), (0, 0, 0)))
                       for (a, b), part in routed.items() if a % stride == row_phase and b % stride == col_phase]
            phases.append(sum(shifted[1:], shifted[0]) if shifted
                          else jnp.zeros((batch, rows, cols, channels), grad.dtype))
        row_phases.append(jnp.stack(phases, axis=3))  # (N, rows, cols, stride, C)
    # (N, rows, row phase, cols, col phase, C) -> the padded input's (N, rows * stride, cols * stride, C).
    padded_grad = jnp.stack(row_phases, axis=2).reshape(batch, rows * stride, cols * stride, channels)
    return (padded_grad[:, padding:padding + height, padding:padding + width, :],)


max_pool_by_phase.defvjp(_max_pool_by_phase_forward, _max_pool_by_phase_backward)


def avg_pool(x: Array, kernel_size: int, stride: int) -> Array:
    """`torch.nn.AvgPool2d(kernel_size, stride)` without padding (floor mode)."""
    return nn.avg_pool(x, (kernel_size, kernel_size), (stride, stride))


def global_avg_pool(x: Array) -> Array:
    """(N, H, W, C) -> (N, C): `AdaptiveAvgPool2d(1)` followed by flatten."""
    return jnp.mean(x, axis=(1, 2))


def adaptive_avg_pool(x: Array, output_size: tuple[int, int]) -> Array:
    """`torch.nn.AdaptiveAvgPool2d(output_size)`: bins [floor(i*H/o), ceil((i+1)*H/o)) on each axis.

    Works for any input size, including inputs smaller than the output (bins then overlap).
    (N, H, W, C) -> (N, oh, ow, C).
    """

    def pool_axis(t: Array, axis: int, out: int) -> Array:
        size = t.shape[axis]
        slices = []
        for i in range(out):
            start = (i * size) // out
            end = -((-(i + 1) * size) // out)
            slices.append(jnp.mean(jax.lax.slice_in_dim(t, start, end, axis=axis), axis=axis, keepdims=True))
        return jnp.concatenate(slices, axis=axis)

    return pool_axis(pool_axis(x, 1, output_size[0]), 2, output_size[1])


def mark_gradcam_target(module: nn.Module, x: Array) -> Array:
    """Marks a classifier's last convolutional stage (N, h, w, C) as the Grad-CAM target 'last_conv'.

    Adds the zero perturbation `perturbations/.../last_conv` (its gradient is the gradient w.r.t. x) and
    sows x into `intermediates`; both are no-ops unless those collections are requested.
    """
    x = module.perturb("last_conv", x)
    module.sow("intermediates", "last_conv", x)
    return x


def dense(features: int, *, dtype: Dtype = None, name: str | None = None, **kwargs: Any) -> nn.Dense:
    """A `torch.nn.Linear` equivalent (kernel stored as (in, out), the transpose of torch's weight)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name, **kwargs)


relu = nn.relu
leaky_relu = functools.partial(nn.leaky_relu, negative_slope=0.01)
