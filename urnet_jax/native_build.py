"""Compiles the package's C and C++ sources into shared libraries on first use.

A library is cached under `$URNET_JAX_CACHE`, else `$XDG_CACHE_HOME/urnet_jax`, else `~/.cache/urnet_jax`,
named after its source and a fingerprint of the source text, the compiler, the command and whatever else the
caller names (e.g. jaxlib's version), so a change to any of them builds it again. Concurrent builders each
write their own file and rename it into place.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from urnet_jax.errors import ConfigError


class BuildError(ConfigError):
    """A native library cannot be built here (the message says why, in one line)."""


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    if os.environ.get("URNET_JAX_CACHE"):
        return Path(os.environ["URNET_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "urnet_jax"


def shared_library(source: Path, *, compiler_env: str, default_compiler: str, flags: Sequence[str],
                   fingerprint: Sequence[str] = (), purpose: str, error_type: type[BuildError] = BuildError) -> Path:
    """Compiles `source` with `$compiler_env` (else `default_compiler`) and `flags` into the cache, unless an
    identical build is there -> the library's path. Raises `error_type` (a `BuildError`) with a one-line message
    when it cannot; `purpose` (e.g. "the onednn conv backend") names what needs the compiler."""
    compiler = shlex.split(os.environ.get(compiler_env) or default_compiler)
    digest = hashlib.sha256("\0".join([source.read_text(), *compiler, *flags, *fingerprint]).encode())
    target = cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise error_type(f"cannot create the build cache {target.parent} ({error.strerror}; set URNET_JAX_CACHE)"
                         ) from None
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = [*compiler, "-O2", "-shared", "-fPIC", str(source), *flags, "-o", str(partial)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise error_type(f"{purpose} needs a compiler ({compiler[0]} not found; set {compiler_env})") from None
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr[-300:])
        raise error_type(f"compiling {source.name} failed: {first_error.strip()}")
    partial.replace(target)  # atomic: concurrent builders each write their own file
    return target
