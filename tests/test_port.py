"""urnet_jax.port: state_dict errors, DenseNet legacy keys, .pth reading with hash-prefix checks, head
replacement, converted checkpoints, load_pretrained, downloads (error paths, local files) and the CLI."""

import hashlib
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urnet_jax import errors, models, port

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet18_state_dict() -> dict:
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory, resnet18_state_dict):
    """A random torchvision resnet18 saved with torch.save, named with its sha256 prefix as torchvision does."""
    path = tmp_path_factory.mktemp("pth") / "resnet18.pth"
    torch.save(resnet18_state_dict, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path.rename(path.with_name(f"resnet18-{digest[:8]}.pth"))


def _same_tree(a, b) -> bool:
    flat_a, flat_b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
    return flat_a.keys() == flat_b.keys() and all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)


def test_every_problem_is_listed_in_one_error(resnet18_state_dict):
    state_dict = dict(resnet18_state_dict)
    del state_dict["layer2.1.bn2.running_var"]
    state_dict["layer5.0.conv1.weight"] = torch.zeros(3)
    state_dict["fc.weight"] = torch.zeros(10, 512)
    with pytest.raises(errors.PortError) as error:
        port.from_torchvision("resnet18", state_dict)
    message = str(error.value)
    assert "\n" not in message
    assert "missing keys (1): layer2.1.bn2.running_var" in message
    assert "unexpected keys (1): layer5.0.conv1.weight" in message
    assert "fc.weight has shape (10, 512), expected (1000, 512)" in message


def test_conversion_layouts(resnet18_state_dict):
    variables = port.from_torchvision("resnet18", resnet18_state_dict)  # num_batches_tracked: ignored
    conv = resnet18_state_dict["layer1.0.conv2.weight"].numpy()  # OIHW
    np.testing.assert_array_equal(variables["params"]["layer1_0"]["conv2"]["kernel"], conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], resnet18_state_dict["fc.weight"].numpy().T)
    np.testing.assert_array_equal(variables["batch_stats"]["layer2_0"]["downsample_1"]["var"],
                                  resnet18_state_dict["layer2.0.downsample.1.running_var"].numpy())


def test_densenet_legacy_keys_of_the_released_file_are_accepted():
    state_dict = {k: v.numpy() for k, v in torchvision.models.densenet121().state_dict().items()}
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state_dict.items()}
    assert legacy.keys() != state_dict.keys()
    assert _same_tree(port.from_torchvision("densenet121", legacy), port.from_torchvision("densenet121", state_dict))


def test_hash_prefix_in_file_name_is_checked(resnet18_pth, tmp_path):
    assert port.load_torchvision_file(resnet18_pth).keys() == torch.load(resnet18_pth, weights_only=True).keys()
    wrong = tmp_path / "resnet18-00000000.pth"
    shutil.copy(resnet18_pth, wrong)
    with pytest.raises(errors.PortError, match="does not match the prefix '00000000'"):
        port.load_torchvision_file(wrong)
    unhashed = tmp_path / "resnet18_finetuned.pth"  # no '-<hex>' suffix: nothing to check
    shutil.copy(resnet18_pth, unhashed)
    assert len(port.load_torchvision_file(unhashed)) == len(port.load_torchvision_file(resnet18_pth))


def test_unreadable_pth_files_give_one_line_errors(tmp_path, monkeypatch):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(errors.PortError, match="not a readable torch .pth"):
        port.load_torchvision_file(garbage)
    with pytest.raises(errors.PortError, match="no such file"):
        port.load_torchvision_file(tmp_path / "missing.pth")
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(errors.PortError, match="not a state_dict"):
        port.load_torchvision_file(tensor_file)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if not installed
    with pytest.raises(errors.PortError, match=r"pip install -e \.\[torch\]"):
        port.load_torchvision_file(tensor_file)


def test_replace_head_initialises_like_the_model(resnet18_state_dict):
    variables = port.from_torchvision("resnet18", resnet18_state_dict)
    rng = jax.random.key(3)
    replaced = port.replace_head(variables, "resnet18", 3, rng)
    model = models.create("resnet18", num_classes=3)
    fresh = jax.jit(lambda key: model.init(key, jnp.zeros((1, 64, 64, 3)), train=False)["params"]["fc"])(rng)
    assert replaced["params"]["fc"]["kernel"].shape == (512, 3)
    assert _same_tree(replaced["params"]["fc"], fresh)
    assert _same_tree({k: v for k, v in replaced["params"].items() if k != "fc"},
                      {k: v for k, v in variables["params"].items() if k != "fc"})
    assert replaced["batch_stats"] is variables["batch_stats"]
    bound = 512**-0.5  # torch.nn.Linear's default init, as torchvision's ResNet keeps it
    assert 0.8 * bound < float(jnp.abs(replaced["params"]["fc"]["kernel"]).max()) <= bound
    logits = model.apply(replaced, jnp.zeros((1, 96, 96, 3)), train=False)
    assert logits.shape == (1, 3)


def test_load_pretrained_from_pth_and_converted_checkpoint(resnet18_pth, resnet18_state_dict, tmp_path):
    rng = jax.random.key(0)
    from_pth = port.load_pretrained(resnet18_pth, "resnet18", 3, rng)
    assert from_pth["params"]["fc"]["kernel"].shape == (512, 3)
    expected = port.from_torchvision("resnet18", resnet18_state_dict)
    assert _same_tree(from_pth["batch_stats"], expected["batch_stats"])
    assert _same_tree(from_pth["params"]["layer4_1"], expected["params"]["layer4_1"])

    converted = tmp_path / "resnet18.msgpack"
    port.save_converted(converted, "resnet18", expected)
    assert _same_tree(port.load_pretrained(converted, "resnet18", 1000, rng), expected)  # 1000 classes: kept
    assert _same_tree(port.load_pretrained(converted, "resnet18", 3, rng), from_pth)  # same rng, same head


def test_body_digest_names_the_weights_whatever_their_head(resnet18_pth, resnet18_state_dict):
    weights = port.from_torchvision("resnet18", resnet18_state_dict)
    digest = port.body_digest(weights, "resnet18")
    assert port.body_digest(port.load_pretrained(resnet18_pth, "resnet18", 3, jax.random.key(0)), "resnet18") == digest
    changed = jax.tree.map(np.array, weights)
    changed["batch_stats"]["bn1"]["mean"][0] += 1e-6
    assert port.body_digest(changed, "resnet18") != digest
    changed = jax.tree.map(np.array, weights)
    changed["params"]["conv1"]["kernel"].flat[0] *= -1
    assert port.body_digest(changed, "resnet18") != digest


def test_load_pretrained_rejects_another_architecture(resnet18_pth, resnet18_state_dict, tmp_path):
    rng = jax.random.key(0)
    with pytest.raises(errors.PortError, match=r"holds resnet18 weights, not resnet34$"):
        port.load_pretrained(resnet18_pth, "resnet34", 3, rng)
    converted = tmp_path / "resnet18.msgpack"
    port.save_converted(converted, "resnet18", port.from_torchvision("resnet18", resnet18_state_dict))
    with pytest.raises(errors.PortError, match=r"is a resnet18 checkpoint, not resnet50$"):
        port.load_pretrained(converted, "resnet50", 3, rng)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(errors.PortError, match="neither a torch .pth file nor a converted checkpoint"):
        port.load_pretrained(other, "resnet18", 3, rng)


def test_download_errors_and_hash_check(resnet18_pth, tmp_path, monkeypatch):
    """No network here: file:// URLs stand in for download.pytorch.org."""
    assert port.torchvision_layout("resnet101").weights["IMAGENET1K_V1"].startswith("https://download.pytorch.org/")
    dest = tmp_path / "weights"
    served = port.torchvision_layout("resnet18").weights
    monkeypatch.setitem(served, "IMAGENET1K_V1", (tmp_path / "absent.pth").as_uri())
    with pytest.raises(errors.PortError, match="could not download"):
        port.download_torchvision("resnet18", dest)
    corrupt = tmp_path / "served" / "resnet18-00000000.pth"  # its name promises another sha256
    corrupt.parent.mkdir()
    shutil.copy(resnet18_pth, corrupt)
    monkeypatch.setitem(served, "IMAGENET1K_V1", corrupt.as_uri())
    with pytest.raises(errors.PortError, match="does not match the prefix"):
        port.download_torchvision("resnet18", dest)
    assert list(dest.iterdir()) == []  # nothing half-written left behind
    monkeypatch.setitem(served, "IMAGENET1K_V1", resnet18_pth.as_uri())
    downloaded = port.download_torchvision("resnet18", dest)
    assert downloaded == dest / resnet18_pth.name and downloaded.read_bytes() == resnet18_pth.read_bytes()
    with pytest.raises(errors.PortError, match="no 'IMAGENET1K_V9' weights"):
        port.download_torchvision("resnet18", dest, weights="IMAGENET1K_V9")


def run_port_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "urnet_jax.port", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_converts_a_pth(resnet18_pth, resnet18_state_dict, tmp_path):
    out = tmp_path / "out" / "resnet18.msgpack"
    result = run_port_cli("--architecture", "resnet18", "--source", resnet18_pth, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"resnet18: 11,689,512 parameters, 1000 classes, {resnet18_pth} -> {out}"
    architecture, variables = port.load_converted(out)
    assert architecture == "resnet18"
    assert _same_tree(variables, port.from_torchvision("resnet18", resnet18_state_dict))


def test_cli_bad_input_is_one_line_without_traceback(resnet18_pth, tmp_path):
    result = run_port_cli("--architecture", "resnet34", "--source", resnet18_pth, "--out", tmp_path / "out.msgpack")
    assert result.returncode == 2
    assert result.stderr == f"error: {resnet18_pth} holds resnet18 weights, not resnet34\n"
    assert not (tmp_path / "out.msgpack").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--architecture", "resnet7", "--source", "x.pth", "--out", "out"],
         "error: flag --architecture=resnet7: value should be one of <resnet18|"),
        (["--architecture", "resnet18", "--source", "missing.pth", "--out", "out"], "error: missing.pth: no such file"),
        (["--architecture", "resnet18", "--source", "x.pth"], "error: flag --out=None: Flag --out must have a value"),
        (["--architecture", "resnet18", "--source"], "error: Missing value for flag --source"),
        (["--arch", "resnet18"], "error: Unknown command line flag 'arch'"),
        (["--architecture", "resnet18", "--source", "x.pth", "--out", "out", "extra"],
         "error: unexpected argument(s): extra"),
    ],
)
def test_cli_errors_are_one_line(arguments, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "urnet_jax.port", *arguments], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()
