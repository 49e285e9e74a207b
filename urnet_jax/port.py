"""torchvision weights -> Flax variables for the classifiers of `urnet_jax.models`.

Python API:
  * `from_torchvision(name, state_dict, num_classes=1000, width=None)`: a torchvision state_dict ->
    {'params', 'batch_stats'} for `models.create(name, num_classes=..., width=...)`;
  * `load_torchvision_file(path)`: reads a .pth (`torch.load(weights_only=True)`), checking the sha256
    prefix that torchvision puts in its file names (`resnet101-cd907fc2.pth`);
  * `convert_torchvision_file(path, name)`: both of the above (the head may have any number of classes);
  * `download_torchvision(name, dest_dir)`: fetches torchvision's ImageNet weights (needs network);
  * `replace_head(variables, name, num_classes, rng)`: a fresh `num_classes` head, initialised as the model does;
  * `save_converted` / `load_converted`: the converted checkpoint format (see below);
  * `load_pretrained(path, name, num_classes, rng)`: a .pth or a converted checkpoint, ready for training.
Every error is a `PortError` (a ValueError) with a one-line message.

Converted checkpoint format: one file, a msgpack map (`flax.serialization.msgpack_serialize`) with keys
'format' (= FORMAT), 'architecture' (a `models.create` name), 'num_classes', 'params', 'batch_stats'.

Which layer is each classifier's head, and where its torchvision weights are, is listed in
`urnet_jax.models.registry` (`ModelSpec.torchvision`).

CLI: `python -m urnet_jax.port --architecture resnet101 --source resnet101-63fe2227.pth --out resnet101.msgpack`
converts a .pth (absl flags; one `error: ...` line and exit status 2 on a bad command line or file).

Name mapping: a Flax path maps to a torch key by writing '_<index>' as '.<index>' in every module name
(`layer1_0/downsample_1` -> `layer1.0.downsample.1`) and renaming the leaf (kernel/scale -> weight,
mean -> running_mean, var -> running_var). Conv kernels OIHW -> HWIO, Linear weights (out,in) -> (in,out).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from urnet_jax import cli, models
from urnet_jax.errors import PortError
from urnet_jax.models import registry, vgg
from urnet_jax.models.registry import TorchvisionLayout

FORMAT = "urnet_jax.port/1"

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}
# torchvision's released DenseNet files name `denselayer1.norm1` as `denselayer1.norm.1` (and so on).
_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$"
)
# torch.hub's convention: `name-<first hex digits of the sha256>.ext`.
_HASH_SUFFIX = re.compile(r".*-([0-9a-f]{6,64})")
_TEMPLATE_INPUT_SHAPE = (1, 64, 64, 3)

Variables = dict[str, Any]


def torchvision_layout(name: str) -> TorchvisionLayout:
    """The torchvision layout of classifier `name`; PortError (one line) for any other name."""
    if name not in registry.CLASSIFIER_NAMES:
        raise PortError(f"unknown classifier {name!r}; known: {', '.join(registry.CLASSIFIER_NAMES)}")
    return registry.MODELS[name].torchvision


def torch_key(path: tuple[str, ...]) -> str:
    """The torchvision state_dict key of the Flax variable at `path`, e.g. ('layer1_0', 'bn1', 'mean')."""
    *modules, leaf = path
    return ".".join([re.sub(r"_(\d+)", r".\1", module) for module in modules] + [_LEAF_TO_TORCH[leaf]])


@functools.lru_cache(maxsize=None)
def _template(name: str, num_classes: int, width: int | None = None) -> dict[tuple[str, ...], Any]:
    """Flattened shapes of `create(name, num_classes=..., width=...)`'s variables, keyed (collection, *path)."""
    model = models.create(name, num_classes=num_classes, width=width)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(_TEMPLATE_INPUT_SHAPE), train=False))
    variables = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    return flax.traverse_util.flatten_dict(variables, keep_empty_nodes=True)


def _expected_keys(name: str) -> set[str]:
    """The torchvision state_dict keys of classifier `name` (without `num_batches_tracked`)."""
    return {torch_key(path[1:]) for path, leaf in _template(name, 1000).items() if hasattr(leaf, "shape")}


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch layout of a Flax shape: HWIO -> OIHW, (in, out) -> (out, in), vectors unchanged."""
    if len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    return tuple(reversed(flax_shape))


def _to_flax(array: np.ndarray, flattened_hw: tuple[int, int] | None) -> np.ndarray:
    """A torch tensor (already checked to have the right shape) in Flax's layout: a float32 copy that never
    aliases the caller's tensor."""
    if array.ndim != 2:
        return np.array(array.transpose(2, 3, 1, 0) if array.ndim == 4 else array, np.float32, order="C")
    kernel = np.array(array.T, np.float32, order="C")  # (out, in) -> (in, out)
    if flattened_hw is not None:
        # torch flattened the input as (C, h, w); the Flax model flattens (h, w, C).
        out_features = kernel.shape[1]
        kernel = kernel.reshape(-1, flattened_hw[0] * flattened_hw[1], out_features).transpose(1, 0, 2)
    return np.ascontiguousarray(kernel).reshape(-1, kernel.shape[-1])


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any float dtype, any device) or array-like -> numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops `num_batches_tracked` counters and renames torchvision's legacy DenseNet keys."""
    return {
        _LEGACY_DENSENET_KEY.sub(r"\1\2", key): value
        for key, value in state_dict.items()
        if not key.endswith("num_batches_tracked")
    }


def _describe(keys: list[str]) -> str:
    return f"({len(keys)}): {', '.join(keys)}"


def from_torchvision(
    name: str, state_dict: Mapping[str, Any], num_classes: int = 1000, width: int | None = None
) -> Variables:
    """Converts a torchvision state_dict of model `name` to {'params', 'batch_stats'} for
    `models.create(name, num_classes=num_classes, width=width)` (values: torch tensors or numpy arrays).

    Raises PortError listing every missing key, unexpected key and shape mismatch at once.
    """
    layout = torchvision_layout(name)
    if not isinstance(state_dict, Mapping):
        raise PortError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    given = _normalise_keys(state_dict)
    missing: list[str] = []
    mismatched: list[str] = []
    converted: dict[tuple[str, ...], Any] = {}
    for path, leaf in _template(name, num_classes, width).items():
        if not hasattr(leaf, "shape"):  # an empty collection (VGG16 has no batch_stats)
            converted[path] = leaf
            continue
        key = torch_key(path[1:])
        if key not in given:
            missing.append(key)
            continue
        array = _to_numpy(given[key])
        expected = _torch_shape(leaf.shape)
        if array.shape != expected:
            mismatched.append(f"{key} has shape {tuple(array.shape)}, expected {expected}")
            continue
        flattened_hw = vgg.POOLED_SIZE if path[1:] == (layout.flattened_input, "kernel") else None
        converted[path] = jnp.asarray(_to_flax(array, flattened_hw))
    unexpected = sorted(set(given) - _expected_keys(name))
    if missing or unexpected or mismatched:
        problems = [
            f"missing keys {_describe(missing)}" if missing else "",
            f"unexpected keys {_describe(unexpected)}" if unexpected else "",
            f"shape mismatches {_describe(mismatched)}" if mismatched else "",
        ]
        raise PortError(
            f"state_dict does not fit {name} with {num_classes} classes: " + "; ".join(p for p in problems if p)
        )
    return flax.traverse_util.unflatten_dict(converted)


def sha256_prefix_in_name(path: str | os.PathLike) -> str | None:
    """The hash prefix torch.hub-style file names carry (`resnet101-cd907fc2.pth` -> 'cd907fc2'), or None."""
    match = _HASH_SUFFIX.fullmatch(pathlib.Path(path).stem)
    return match.group(1) if match else None


def _verify_sha256_prefix(path: str | os.PathLike, prefix: str, label: str | os.PathLike) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise PortError(
            f"{label}: sha256 {digest.hexdigest()[:len(prefix)]}... does not match the prefix {prefix!r} in the "
            "file name (corrupt or incomplete download?; rename the file if that suffix is not a hash)"
        )


def check_hash_prefix(path: str | os.PathLike) -> None:
    """Raises PortError when the file's name carries a sha256 prefix that its content does not have."""
    prefix = sha256_prefix_in_name(path)
    if prefix is not None:
        _verify_sha256_prefix(path, prefix, path)


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        message = f"reading .pth files needs PyTorch ({error}); install it with: pip install -e .[torch]"
        raise PortError(message) from None
    return torch


def load_torchvision_file(path: str | os.PathLike, check_hash: bool = True) -> dict[str, Any]:
    """Reads a torchvision .pth state_dict with `torch.load(weights_only=True)` (torch tensors, on CPU).

    With `check_hash`, a sha256 prefix in the file name (torch.hub's `name-<hex>.pth`) must match the content.
    """
    if not os.path.isfile(path):
        raise PortError(f"{path}: no such file")
    if check_hash:
        check_hash_prefix(path)
    torch = _import_torch()
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PortError(f"{path}: not a readable torch .pth state_dict ({first_line})") from None
    if not isinstance(state_dict, Mapping) or not all(isinstance(key, str) for key in state_dict):
        raise PortError(f"{path}: holds a {type(state_dict).__name__}, not a state_dict")
    return dict(state_dict)


def download_torchvision(
    name: str, dest_dir: str | os.PathLike, weights: str = "IMAGENET1K_V1", timeout_s: float = 60.0
) -> pathlib.Path:
    """Downloads torchvision's `weights` for classifier `name` into `dest_dir` (kept if already there and
    its hash matches) and returns the file's path. Raises PortError when the download or hash check fails.
    """
    available = torchvision_layout(name).weights
    if weights not in available:
        raise PortError(f"{name} has no {weights!r} weights; available: {', '.join(available)}")
    url = available[weights]
    dest = pathlib.Path(dest_dir) / pathlib.Path(urllib.parse.urlparse(url).path).name
    if dest.is_file():
        check_hash_prefix(dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, suffix=".part", delete=False) as partial:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    partial.write(chunk)
        except (urllib.error.URLError, OSError) as error:
            partial.close()
            os.unlink(partial.name)
            raise PortError(f"could not download {url}: {error}") from None
    try:
        _verify_sha256_prefix(partial.name, sha256_prefix_in_name(dest) or "", url)
    except PortError:
        os.unlink(partial.name)
        raise
    os.replace(partial.name, dest)
    return dest


def replace_head(
    variables: Variables, name: str, num_classes: int, rng: jax.Array, width: int | None = None
) -> Variables:
    """`variables` of classifier `name` with the head swapped for a fresh `num_classes` head, initialised
    exactly as `create(name, num_classes=num_classes, width=width).init(rng, ...)` initialises it."""
    head = torchvision_layout(name).head
    model = models.create(name, num_classes=num_classes, width=width)
    init_head = jax.jit(lambda key: model.init(key, jnp.zeros(_TEMPLATE_INPUT_SHAPE), train=False)["params"][head])
    new_head = init_head(rng)
    old_in, new_in = variables["params"][head]["kernel"].shape[0], new_head["kernel"].shape[0]
    if old_in != new_in:
        raise PortError(f"{name} head takes {old_in} features in these variables but {new_in} at width={width}")
    return {**variables, "params": {**variables["params"], head: new_head}}


def body_digest(variables: Variables, name: str) -> str:
    """SHA-256 (hex) of classifier `name`'s variables without its head's params: what a fine-tuned model
    inherits from pretrained weights, whatever head they came with. Each leaf counts by its path and its
    float32 bytes, in path order, so the same weights give the same digest from a .pth or a run's checkpoint."""
    head = torchvision_layout(name).head
    digest = hashlib.sha256()
    leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    for key in sorted(leaves):
        if not key.startswith(f"['params']['{head}']"):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(np.asarray(leaves[key], np.float32)).tobytes())
    return digest.hexdigest()


def num_classes_of(variables: Variables, name: str) -> int:
    """The number of classes of classifier `name`'s `variables` (its head's output size)."""
    return int(variables["params"][torchvision_layout(name).head]["kernel"].shape[-1])


def save_converted(path: str | os.PathLike, name: str, variables: Variables) -> None:
    """Writes `variables` of classifier `name` as a converted checkpoint (the format of this module's doc)."""
    torchvision_layout(name)
    content = {
        "format": FORMAT,
        "architecture": name,
        "num_classes": num_classes_of(variables, name),
        "params": jax.device_get(variables["params"]),
        "batch_stats": jax.device_get(variables.get("batch_stats", {})),
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(flax.serialization.msgpack_serialize(content))
    os.replace(partial, path)


def _is_torch_file(path: str | os.PathLike) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle: 0x80 then the protocol, 2..5)."""
    with open(path, "rb") as file:
        header = file.read(2)
    return zipfile.is_zipfile(path) or (len(header) == 2 and header[0] == 0x80 and 2 <= header[1] <= 5)


def load_converted(path: str | os.PathLike) -> tuple[str, Variables]:
    """Reads a converted checkpoint: (architecture name, {'params', 'batch_stats'})."""
    try:
        content = flax.serialization.msgpack_restore(pathlib.Path(path).read_bytes())
    except Exception:  # msgpack raises many types on foreign bytes; all mean "not our format"
        content = None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise PortError(f"{path}: neither a torch .pth file nor a converted checkpoint ({FORMAT})")
    variables = {"params": content["params"], "batch_stats": content["batch_stats"]}
    return content["architecture"], jax.tree.map(jnp.asarray, variables)


def _identify(state_dict: Mapping[str, Any]) -> str | None:
    """The classifier whose torchvision key set `state_dict` has, if any."""
    keys = set(_normalise_keys(state_dict))
    return next((name for name in registry.CLASSIFIER_NAMES if keys == _expected_keys(name)), None)


def convert_torchvision_file(path: str | os.PathLike, name: str) -> Variables:
    """`from_torchvision` on a .pth file (its head may have any number of classes).

    Raises PortError (one line) naming the architecture the file holds when that is not `name`.
    """
    head = torchvision_layout(name).head
    state_dict = load_torchvision_file(path)
    head_weight = state_dict.get(torch_key((head, "kernel")))
    num_classes = head_weight.shape[0] if head_weight is not None and len(head_weight.shape) == 2 else 1000
    try:
        return from_torchvision(name, state_dict, num_classes=num_classes)
    except PortError as error:
        actual = _identify(state_dict)
        if actual is not None and actual != name:
            raise PortError(f"{path} holds {actual} weights, not {name}") from None
        raise PortError(f"{path}: {error}") from None


def load_pretrained(path: str | os.PathLike, name: str, num_classes: int, rng: jax.Array) -> Variables:
    """Variables for `create(name, num_classes=num_classes)` from a torchvision .pth file or a converted
    checkpoint; the head is replaced by a fresh one (from `rng`) unless it already has `num_classes` outputs.

    Raises PortError (one line) when the file is unreadable or holds another architecture.
    """
    torchvision_layout(name)
    if not os.path.isfile(path):
        raise PortError(f"{path}: no such file")
    if _is_torch_file(path):
        variables = convert_torchvision_file(path, name)
    else:
        architecture, variables = load_converted(path)
        if architecture != name:
            raise PortError(f"{path} is a {architecture} checkpoint, not {name}")
    if num_classes_of(variables, name) != num_classes:
        variables = replace_head(variables, name, num_classes, rng)
    return variables


def convert_file(architecture: str, source: str | os.PathLike, out: str | os.PathLike) -> str:
    """Converts the torchvision .pth `source` of `architecture` into the converted checkpoint `out`;
    returns a one-line summary. Raises PortError (one line) on a bad file or an unwritable `out`."""
    variables = convert_torchvision_file(source, architecture)
    try:
        save_converted(out, architecture, variables)
    except OSError as error:
        raise PortError(f"cannot write {out}: {error.strerror or error}") from None
    num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
    return (f"{architecture}: {num_params:,} parameters, {num_classes_of(variables, architecture)} classes, "
            f"{source} -> {out}")


def main(argv: list[str]) -> None:
    """`python -m urnet_jax.port --architecture NAME --source FILE.pth --out FILE.msgpack`."""
    logging.set_verbosity(logging.WARNING)
    with cli.one_line_errors():
        cli.reject_positional_args(argv)
        print(convert_file(_ARCHITECTURE.value, _SOURCE.value, _OUT.value))


if __name__ == "__main__":
    _ARCHITECTURE = flags.DEFINE_enum("architecture", None, registry.CLASSIFIER_NAMES, "the classifier")
    _SOURCE = flags.DEFINE_string("source", None, "torchvision .pth state_dict (e.g. resnet101-63fe2227.pth)")
    _OUT = flags.DEFINE_string("out", None, "converted checkpoint to write (msgpack, e.g. resnet101.msgpack)")
    flags.mark_flags_as_required(["architecture", "source", "out"])
    app.run(main, flags_parser=cli.parse_flags)
