"""XLA compiler options of the library's jitted programs, per platform, and `jit` that applies them.

On the CPU, jaxlib 0.10's XLA hands convolutions and reductions to YNNPACK (`__ynn_fusion`) by default.
YNNPACK runs the high-resolution, few-channel convolutions of the UR-Net enhancer on one thread and its
weight gradients 2-4x slower than XLA's own (Eigen) convolutions (`bench/convolutions.py`). Without
YNNPACK at all, XLA rewrites every large reduction (BatchNorm's batch statistics and their gradients) into
a tree of `reduce-window` ops, which took about a fifth of the UR-Net(32) + ResNet18 train step's op time.
So CPU programs are compiled by one of these named option sets (`CPU_OPTION_SETS`, chosen by the config's
`xla_cpu_options`):

  * 'ynnpack_reductions' (the default): YNNPACK for reductions only, XLA's own convolutions; the train step
    above took 1.8x less CPU time than with 'no_ynnpack' on a 2-core CPU (docs/BENCHMARKS.md);
  * 'no_ynnpack': no YNNPACK fusions (the library's options before 'ynnpack_reductions'; a study pins it
    to keep the numerics of its earlier runs);
  * 'xla_defaults': XLA's own defaults.

The sets give the same results up to float rounding. Other platforms get no options. The environment
variable `URNET_JAX_XLA_DEFAULTS=1` compiles every program with XLA's defaults whatever the set; a jaxlib
that does not know an option compiles with its defaults too.

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

from urnet_jax.config import XLA_CPU_OPTIONS

CPU_OPTION_SETS: dict[str, dict[str, str]] = {
    "ynnpack_reductions": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    "no_ynnpack": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "xla_defaults": {},
}
DEFAULT_CPU_OPTIONS = XLA_CPU_OPTIONS[0]  # the config's names of CPU_OPTION_SETS, the default first
DEFAULTS_ENV = "URNET_JAX_XLA_DEFAULTS"
UNOPTIMISED = {"xla_backend_optimization_level": 0}

_selected_cpu_options = DEFAULT_CPU_OPTIONS


def use_cpu_options(name: str) -> None:
    """Compiles the CPU programs compiled from now on in this process with the option set `name` (a key of
    `CPU_OPTION_SETS`; a run's config.xla_cpu_options). Programs already compiled keep their options."""
    if name not in CPU_OPTION_SETS:
        raise ValueError(f"xla_cpu_options must be one of {', '.join(CPU_OPTION_SETS)}, got {name!r}")
    global _selected_cpu_options
    _selected_cpu_options = name


def selected_cpu_options() -> str:
    """The name of the option set that CPU programs are compiled with now."""
    return _selected_cpu_options


def for_platform(platform: str) -> dict[str, str]:
    """The compiler options of programs compiled now for `platform` ('cpu', 'gpu', 'tpu'); {} for XLA's
    defaults."""
    if platform != "cpu" or os.environ.get(DEFAULTS_ENV, "") not in ("", "0"):
        return {}
    return _known_options(_selected_cpu_options)


@functools.cache
def _known_options(name: str) -> dict[str, str]:
    """CPU_OPTION_SETS[name] if this jaxlib compiles with it, else {} (its defaults)."""
    options = CPU_OPTION_SETS[name]
    try:  # a jaxlib without the option (or the value) rejects it at compile time
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - any rejection means: compile with the defaults
        return {}
    return dict(options)


def for_mesh(mesh: jax.sharding.Mesh) -> dict[str, str]:
    """The compiler options of programs that run on `mesh`'s devices."""
    return for_platform(mesh.devices.flat[0].platform)


def jit(function: Callable, **jit_kwargs: Any) -> Callable:
    """`jax.jit(function, **jit_kwargs)` compiled with the default backend's options (`for_platform`), which
    are looked up at each call (so that importing a module does not start a JAX backend, and a program
    follows `use_cpu_options`). Called inside another transformation (traced arguments), it is a plain
    nested `jax.jit`: the options belong to the outermost program."""
    nested = jax.jit(function, **jit_kwargs)

    @functools.cache
    def top_level(options: tuple[tuple[str, str], ...]) -> Callable:
        return jax.jit(function, compiler_options=dict(options), **jit_kwargs)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
            return nested(*args, **kwargs)
        return top_level(tuple(sorted(for_platform(jax.default_backend()).items())))(*args, **kwargs)

    return call


def run_unoptimised(function: Callable, *args: Any, jit_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)` as one program compiled without XLA's backend optimisation (module
    docstring), e.g. `run_unoptimised(module.init, key, images, train=False)`. `args` are traced (arrays);
    `kwargs` are fixed into the program (Python values such as `train` or `method`); `jit_kwargs` go to
    `jax.jit` (e.g. out_shardings)."""
    program = jax.jit(functools.partial(function, **kwargs), **(jit_kwargs or {}))
    return program.lower(*args).compile(compiler_options=UNOPTIMISED)(*args)
