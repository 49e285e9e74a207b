"""XLA compiler options of the library's jitted programs, per platform, and `jit` that applies them.

On the CPU, jaxlib 0.10's XLA hands convolutions to YNNPACK (`__ynn_fusion`). YNNPACK runs the
high-resolution, few-channel convolutions of the UR-Net enhancer on one thread and its weight gradients
2-4x slower than XLA's own (Eigen) convolutions (`bench/convolutions.py`); with YNNPACK's convolutions
turned off, the UR-Net(32) + ResNet18 train step at 128 px, batch 16, ran 1.24x faster and the eval step
1.65x faster on a 2-core CPU, and equally fast on one core (docs/BENCHMARKS.md). So CPU programs are
compiled with `xla_cpu_experimental_ynn_fusion_type` empty (no YNNPACK fusions); other platforms get no
options. Set the environment variable `URNET_JAX_XLA_DEFAULTS=1` to compile with XLA's defaults. A jaxlib
that does not know the option compiles with its defaults too.

Code that runs once, such as a model's initialisers, is better compiled without optimisation
(`run_unoptimised`): XLA's CPU backend otherwise spends most of its compile time optimising the
random-number code of every parameter's initialiser (`module.init` of the tiny UR-Net(4) + ResNet18(4) of
the tests compiled in 101 s optimised and in 14 s unoptimised, on a 2-core CPU busy with another job).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
DEFAULTS_ENV = "URNET_JAX_XLA_DEFAULTS"
UNOPTIMISED = {"xla_backend_optimization_level": 0}


@functools.cache
def for_platform(platform: str) -> dict[str, str]:
    """The compiler options of programs compiled for `platform` ('cpu', 'gpu', 'tpu'); {} for XLA's defaults."""
    if platform != "cpu" or os.environ.get(DEFAULTS_ENV, "") not in ("", "0"):
        return {}
    try:  # a jaxlib without the option rejects it at compile time
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - any rejection means: compile with the defaults
        return {}
    return dict(CPU_OPTIONS)


def for_mesh(mesh: jax.sharding.Mesh) -> dict[str, str]:
    """The compiler options of programs that run on `mesh`'s devices."""
    return for_platform(mesh.devices.flat[0].platform)


def jit(function: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit(function, **jit_kwargs)` compiled with the default backend's options (`for_platform`), which
    are looked up at the first call, so that importing a module does not start a JAX backend. Called inside
    another transformation (traced arguments), it is a plain nested `jax.jit`: the options belong to the
    outermost program."""
    nested = jax.jit(function, **jit_kwargs)

    @functools.cache
    def top_level() -> Callable:
        return jax.jit(function, compiler_options=for_platform(jax.default_backend()), **jit_kwargs)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return (nested if traced else top_level())(*args, **kwargs)

    return call


def run_unoptimised(function: Callable, *args: Any, jit_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` as one program compiled without XLA's backend optimisation (module
    docstring), e.g. `run_unoptimised(module.init, key, images, train=False)`. `args` are traced (arrays);
    `kwargs` are fixed into the program (Python values such as `train` or `method`); `jit_kwargs` go to
    `jax.jit` (e.g. out_shardings)."""
    program = jax.jit(functools.partial(function, **kwargs), **(jit_kwargs or {}))
    return program.lower(*args).compile(compiler_options=UNOPTIMISED)(*args)
