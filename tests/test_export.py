"""`resnetlab export` (TorchScript always, ONNX when onnx/onnxscript/onnxruntime are installed) and
the torch.hub entry points in hubconf.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resnetlab
from evalkit import CLASSES, assert_one_line_error, run_cli, write_checkpoint
from resnetlab import export as export_mod
from resnetlab.data import Normalizer, compute_normalizer
from resnetlab.export import Normalized, read_metadata, with_normalization
from resnetlab.models import VARIANTS

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = "resnet20-cifar10"


def _jit_load(path):
    with export_mod._quiet():
        return torch.jit.load(str(path), map_location="cpu")


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def per_pixel_checkpoint(tmp_path_factory):
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    normalization = compute_normalizer(images, "per_pixel").to_dict()
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "pp.safetensors", normalization=normalization)


def _eager(source):
    model, metadata = resnetlab.load(source)
    return with_normalization(model, metadata), metadata


def test_torchscript_round_trip_of_a_tiny_checkpoint(capsys, tmp_path, checkpoint_file):
    out = tmp_path / "tiny.pt"
    code, stdout, err = run_cli(capsys, "export", checkpoint_file, "--format", "torchscript", "--out", out)
    assert code == 0, err
    assert "max abs difference vs PyTorch" in stdout and "[0, 1]" in stdout
    eager, metadata = _eager(checkpoint_file)
    batch = torch.rand(5, 3, 32, 32)  # traced with 1 image: a trace of a ResNet takes any batch
    with torch.no_grad():
        diff = (_jit_load(out)(batch) - eager(batch)).abs().max().item()
    assert diff <= 1e-5
    stored = read_metadata(out)
    assert stored["classes"] == CLASSES and stored["normalization"] == "included"
    assert os.stat(out).st_mode & 0o777 == 0o644


def test_bundled_resnet20_export_classifies_like_predict(capsys, tmp_path):
    """The exported file, fed uint8 / 255, gives the logits `predict` computes (normaliser included)."""
    out = tmp_path / "resnet20.pt"
    code, _, err = run_cli(capsys, "export", BUNDLED, "--format", "torchscript", "--out", out, "--batch", "2")
    assert code == 0, err
    model, metadata = resnetlab.load(BUNDLED)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(Normalizer.from_dict(metadata["normalization"])(pixels))
        exported = _jit_load(out)(pixels.float() / 255)
        eager = with_normalization(model, metadata)(pixels.float() / 255)
    assert (exported - eager).abs().max().item() <= 1e-5
    assert (exported - expected).abs().max().item() <= 1e-4  # two float orders of the same normalisation
    assert torch.equal(exported.argmax(1), expected.argmax(1))


def test_library_export_and_verify(tmp_path):
    model = resnetlab.create_model("resnet8", num_classes=3).eval()
    example = torch.rand(2, 3, 32, 32)
    report = export_mod.export_torchscript(model, example, tmp_path / "m.pt", metadata={"classes": ["a"]})
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-5
    assert report.output_shape == (2, 3) and report.size_bytes == (tmp_path / "m.pt").stat().st_size
    assert export_mod.verify(tmp_path / "m.pt", "torchscript", model, [torch.rand(3, 3, 32, 32)]) <= 1e-5
    # The check can fail: a different model is not reproduced by this file.
    other = resnetlab.create_model("resnet8", num_classes=3).eval()
    assert export_mod.verify(tmp_path / "m.pt", "torchscript", other, [torch.rand(3, 3, 32, 32)]) > 1e-3


def _small(name: str, **options):
    """A quarter-width model of the registered `name` and a small input of its family."""
    size = 64 if resnetlab.models.model_info(name)["family"] == "imagenet" else 32
    return resnetlab.create_model(name, num_classes=5, width=0.25, **options).eval(), size


def _one_per_architecture_kind() -> list[str]:
    """The shallowest registered name of each (family, block type, plain) kind: deeper names of a
    kind differ only in the number of blocks per stage (2 cores: tracing resnet1202 takes minutes)."""
    kinds: dict[tuple, str] = {}
    for name in resnetlab.list_models():
        info = resnetlab.models.model_info(name)
        key = (info["family"], info["block_type"], info["plain"])
        if key not in kinds or info["depth"] < resnetlab.models.model_info(kinds[key])["depth"]:
            kinds[key] = name
    return sorted(kinds.values())


@pytest.mark.parametrize("name", _one_per_architecture_kind())
def test_every_kind_of_registered_model_survives_a_torchscript_round_trip(name):
    model, size = _small(name)
    data = export_mod.torchscript_bytes(model, torch.rand(2, 3, size, size))
    assert export_mod.verify(data, "torchscript", model, [torch.rand(3, 3, size, size)]) <= 1e-5


@pytest.mark.parametrize("options", [{"shortcut": "B"}, {"shortcut": "C"}, *({"block": v} for v in VARIANTS[1:])],
                         ids=lambda o: "-".join(map(str, o.values())))
def test_every_block_and_shortcut_option_survives_a_torchscript_round_trip(options):
    model, size = _small("resnet8", **options)
    data = export_mod.torchscript_bytes(model, torch.rand(2, 3, size, size))
    assert export_mod.verify(data, "torchscript", model, [torch.rand(3, 3, size, size)]) <= 1e-5


def test_a_run_directory_is_a_source(capsys, tmp_path, checkpoint_file):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.safetensors").write_bytes(checkpoint_file.read_bytes())
    code, stdout, err = run_cli(capsys, "export", run_dir, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert code == 0, err
    assert "last.safetensors" in stdout
    code, stdout, err = run_cli(capsys, "export", tmp_path, "--format", "torchscript", "--out", tmp_path / "n.pt")
    assert_one_line_error(code, stdout, err, "no checkpoints/last.safetensors")


def test_per_pixel_normalisation_fixes_the_input_size(capsys, tmp_path, per_pixel_checkpoint):
    out = tmp_path / "pp.pt"
    code, stdout, err = run_cli(capsys, "export", per_pixel_checkpoint, "--format", "torchscript", "--out", out,
                                "--input-size", "40", "40")
    assert_one_line_error(code, stdout, err, "per-pixel mean", "--no-normalization")
    assert not out.exists()
    code, stdout, err = run_cli(capsys, "export", per_pixel_checkpoint, "--format", "torchscript", "--out", out,
                                "--input-size", "40", "40", "--no-normalization")
    assert code == 0, err
    assert "NOT included" in stdout
    assert _jit_load(out)(torch.rand(1, 3, 40, 40)).shape == (1, 3)
    assert read_metadata(out)["normalization"]["mode"] == "per_pixel"  # stored for the caller to apply


def test_missing_and_corrupt_sources_are_one_line_errors(capsys, tmp_path, checkpoint_file):
    out = tmp_path / "model.pt"
    out.write_bytes(b"precious")
    code, stdout, err = run_cli(capsys, "export", tmp_path / "nope.safetensors", "--format", "torchscript", "--out", out)
    assert_one_line_error(code, stdout, err, "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(checkpoint_file.read_bytes()[:-1000])
    code, stdout, err = run_cli(capsys, "export", corrupt, "--format", "torchscript", "--out", out)
    assert_one_line_error(code, stdout, err, "truncated or corrupt")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--format", "tflite"], "unknown --format 'tflite'"),
    (["--format", "torchscript", "--batch", "0"], "--batch"),
    (["--format", "torchscript", "--opset", "17"], "--opset applies to --format onnx"),
    (["--format", "torchscript", "--atol", "nan"], "--atol"),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, checkpoint_file, argv, fragment):
    code, stdout, err = run_cli(capsys, "export", checkpoint_file, "--out", tmp_path / "m.pt", *argv)
    assert code == 2
    assert_one_line_error(code, stdout, err, fragment)
    assert not (tmp_path / "m.pt").exists()


def test_a_failed_check_leaves_the_existing_output_untouched(capsys, tmp_path, checkpoint_file, monkeypatch):
    out = tmp_path / "model.pt"
    out.write_bytes(b"precious")
    real = export_mod.load_runner
    monkeypatch.setattr(export_mod, "load_runner", lambda data, fmt: (lambda b, run=real(data, fmt): run(b) + 0.01))
    code, stdout, err = run_cli(capsys, "export", checkpoint_file, "--format", "torchscript", "--out", out)
    assert_one_line_error(code, stdout, err, "differs from PyTorch", "was not written")
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind
    code, stdout, err = run_cli(capsys, "export", checkpoint_file, "--format", "torchscript", "--out", tmp_path)
    assert_one_line_error(code, stdout, err, "is a directory")
    code, stdout, err = run_cli(capsys, "export", checkpoint_file, "--format", "torchscript", "--out", out, "--no-check")
    assert code == 0 and "not checked" in stdout
    assert out.read_bytes()[:2] == b"PK"


def test_missing_onnx_packages_are_a_one_line_error(capsys, tmp_path, checkpoint_file, monkeypatch):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    code, stdout, err = run_cli(capsys, "export", checkpoint_file, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert_one_line_error(code, stdout, err, "pip install 'resnetlab[export]'")


@pytest.fixture(scope="module")
def onnxruntime():
    pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' package (pip install 'resnetlab[export]')")
    pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs 'onnxscript' (pip install 'resnetlab[export]')")
    return pytest.importorskip("onnxruntime", reason="checking an ONNX export needs onnxruntime (pip install 'resnetlab[export]')")


def test_onnx_round_trip_with_a_dynamic_batch(capsys, tmp_path, checkpoint_file, onnxruntime):
    out = tmp_path / "tiny.onnx"
    code, stdout, err = run_cli(capsys, "export", checkpoint_file, "--format", "onnx", "--out", out, "--dynamic-batch")
    assert code == 0, err
    assert "input Nx3x32x32" in stdout
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    eager, _ = _eager(checkpoint_file)
    for n in (1, 4):
        batch = torch.rand(n, 3, 32, 32)
        got = torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0])
        with torch.no_grad():
            assert (got - eager(batch)).abs().max().item() <= 1e-4
    assert read_metadata(out)["classes"] == CLASSES


def test_onnx_static_batch_and_opset(capsys, tmp_path, onnxruntime):
    out = tmp_path / "resnet20.onnx"
    code, stdout, err = run_cli(capsys, "export", BUNDLED, "--format", "onnx", "--out", out, "--batch", "2", "--opset", "18")
    assert code == 0, err
    assert "input 2x3x32x32" in stdout
    import onnx

    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [18]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 32, 32]


def test_onnx_export_of_an_imagenet_model(tmp_path, onnxruntime):
    """Max-pooling stem and option-B projections through torch.onnx and onnxruntime."""
    model, size = _small("resnet18")
    report = export_mod.export_onnx(model, torch.rand(1, 3, size, size), tmp_path / "r18.onnx", dynamic_batch=True)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert report.output_shape == (1, 5)


# --- torch.hub -------------------------------------------------------------------------------------

def test_hub_loads_the_bundled_weights():
    model = torch.hub.load(str(REPO_ROOT), "resnet20", source="local", pretrained=True)
    reference, metadata = resnetlab.load(BUNDLED)
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(batch), reference(batch))
    assert model.resnetlab_metadata["classes"] == metadata["classes"]
    wrapped = torch.hub.load(str(REPO_ROOT), "resnet20", source="local", pretrained=True, normalize=True)
    assert isinstance(wrapped, Normalized)


def test_hub_entry_points_cover_the_registry_and_build_untrained_models():
    import importlib.util

    spec = importlib.util.spec_from_file_location("resnetlab_hubconf", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert set(resnetlab.list_models()) <= {name for name in dir(hubconf) if not name.startswith("_")}
    model = torch.hub.load(str(REPO_ROOT), "resnet32", source="local", num_classes=7)
    assert model.fc.out_features == 7


def test_hub_errors_are_clear(checkpoint_file):
    with pytest.raises(resnetlab.ResnetlabError, match="no bundled weights for resnet56"):
        torch.hub.load(str(REPO_ROOT), "resnet56", source="local", pretrained=True)
    with pytest.raises(resnetlab.ResnetlabError, match="do not match the pretrained weights"):
        torch.hub.load(str(REPO_ROOT), "resnet20", source="local", pretrained=True, num_classes=100)
    with pytest.raises(resnetlab.ResnetlabError, match="are for resnet8, not resnet20"):
        torch.hub.load(str(REPO_ROOT), "resnet20", source="local", weights=str(checkpoint_file))
    with pytest.raises(resnetlab.ResnetlabError, match="needs pretrained weights"):
        torch.hub.load(str(REPO_ROOT), "resnet20", source="local", normalize=True)


def test_hub_loads_any_checkpoint_by_weights():
    model = torch.hub.load(str(REPO_ROOT), "resnet20", source="local", weights=BUNDLED)
    assert model.resnetlab_metadata["model"] == "resnet20" and not model.training


def test_hubconf_imports_resnetlab_from_src_when_it_is_not_installed():
    """`python -S` skips site-packages' .pth files, so the editable install is invisible; torch
    stays importable through PYTHONPATH."""
    site_packages = Path(torch.__file__).resolve().parents[1]
    code = ("import importlib.util, torch; assert importlib.util.find_spec('resnetlab') is None; "
            f"m = torch.hub.load({str(REPO_ROOT)!r}, 'resnet20', source='local', pretrained=True); "
            "import resnetlab; print(resnetlab.__file__, type(m).__name__)")
    env = {**os.environ, "PYTHONPATH": str(site_packages)}
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(REPO_ROOT / "src" / "resnetlab" / "__init__.py"), "ResNet"]
