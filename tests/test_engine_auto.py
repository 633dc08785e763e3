"""`engine="auto"` (the default of Captioner.from_checkpoint, `caption --checkpoint` and `evaluate`): ONNX Runtime
on a CPU with the [export] extra, through an fp32 export cached by the checkpoint's content hash; PyTorch on a GPU,
without the extra, or when no cache folder can be written (one line saying why)."""
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from captioning import Captioner
from captioning.captioner import engines
from captioning.cli.main import main

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or
                               importlib.util.find_spec("onnx") is None,
                               reason="onnx/onnxruntime not installed: pip install -e '.[export]'")


@pytest.fixture
def checkpoint(tiny_run, tmp_path, monkeypatch):
    """A copy of the tiny run's best.pt (with its splits) in a folder of its own; the system cache in tmp_path."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "splits.json"):
        shutil.copy(tiny_run / name, run / name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return run / "best.pt"


@pytest.fixture
def images(shapes_dir):
    return sorted((shapes_dir / "flickr30k_images").iterdir())[:6]


def export_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == engines.__name__]


@needs_ort
def test_auto_exports_once_into_the_cache_then_loads_it(checkpoint, images, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    first = Captioner.from_checkpoint(checkpoint)
    lines = export_lines(caplog)
    assert len(lines) == 1 and "exported" in lines[0] and " s, once" in lines[0], lines
    folder = first.export["folder"]
    assert folder.parent == checkpoint.parent / ".export-cache" and first.model is None   # ONNX Runtime's
    torch_captions = Captioner.from_checkpoint(checkpoint, precision="fp32", engine="torch").caption(images)
    assert [r.caption for r in first.caption(images)] == [r.caption for r in torch_captions]

    import captioning.decode.export as export_module
    monkeypatch.setattr(export_module, "export", lambda *a, **k: pytest.fail("exported again"))
    caplog.clear()
    second = Captioner.from_checkpoint(checkpoint)
    assert second.export["folder"] == folder and export_lines(caplog) == []


@needs_ort
def test_a_cache_hit_imports_no_torch(checkpoint, images):
    Captioner.from_checkpoint(checkpoint)              # makes the export
    code = (f"import sys; from captioning import Captioner; c = Captioner.from_checkpoint({str(checkpoint)!r}); "
            f"print(c({str(images[0])!r}) != '', 'torch' in sys.modules)")
    env = {**os.environ, "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["True", "False"], out


@needs_ort
def test_a_changed_checkpoint_is_exported_again_and_its_stale_export_removed(checkpoint, caplog):
    caplog.set_level(logging.INFO)
    old = Captioner.from_checkpoint(checkpoint).export["folder"]
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"] + 1.0     # same path, same size, other weights
    torch.save(ckpt, checkpoint)
    caplog.clear()
    new = Captioner.from_checkpoint(checkpoint)
    assert new.export["folder"] != old and len(export_lines(caplog)) == 1
    assert not old.exists() and [p.name for p in new.export["folder"].parent.iterdir()] == [new.export["folder"].name]
    fresh = Captioner.from_checkpoint(checkpoint, precision="fp32", engine="torch")
    assert torch.equal(fresh.model.head.bias, ckpt["model"]["head.bias"])


@needs_ort
def test_a_newer_exporter_exports_again_and_removes_the_older_export(checkpoint, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    old = Captioner.from_checkpoint(checkpoint).export["folder"]
    monkeypatch.setattr(engines, "EXPORTER_REVISION", engines.EXPORTER_REVISION + 1)   # graphs changed since
    caplog.clear()
    new = Captioner.from_checkpoint(checkpoint).export["folder"]
    assert new != old and len(export_lines(caplog)) == 1
    assert [p.name for p in new.parent.iterdir()] == [new.name]
    caplog.clear()
    assert Captioner.from_checkpoint(checkpoint).export["folder"] == new and not export_lines(caplog)


@needs_ort
def test_a_cache_folder_that_cannot_be_written_falls_back_to_the_system_cache_then_to_pytorch(
        checkpoint, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    (tmp_path / "a_file").write_text("in the way")
    captioner = Captioner.from_checkpoint(checkpoint, cache_dir=tmp_path / "a_file" / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write the export cache" in warnings[0] and str(tmp_path / "xdg") in \
        warnings[0], warnings
    assert captioner.export["folder"].parent == tmp_path / "xdg" / "captioning"

    caplog.clear()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file" / "xdg"))
    captioner = Captioner.from_checkpoint(checkpoint, cache_dir=tmp_path / "a_file" / "cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith("captioning with PyTorch"), warnings
    assert captioner.model is not None and not hasattr(captioner, "export")         # PyTorch's


@needs_ort
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_beside_the_checkpoint_falls_back_to_the_system_cache(checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    checkpoint.parent.chmod(0o555)
    try:
        captioner = Captioner.from_checkpoint(checkpoint)
    finally:
        checkpoint.parent.chmod(0o755)
    assert captioner.export["folder"].parent == tmp_path / "xdg" / "captioning"
    assert any("cannot write the export cache" in line for line in export_lines(caplog))


def test_without_onnxruntime_auto_is_pytorch_and_onnx_says_what_to_install(checkpoint, monkeypatch, capsys,
                                                                          images):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else
                        real(name, *a))
    captioner = Captioner.from_checkpoint(checkpoint)
    assert captioner.model is not None and not (checkpoint.parent / ".export-cache").exists()
    assert main(["caption", "--checkpoint", str(checkpoint), "--engine", "onnx", str(images[0])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[export]'" in err[0], err


def test_auto_is_pytorch_on_a_gpu_and_at_a_reduced_precision(monkeypatch):
    assert engines.choose_engine("auto", "cuda") == engines.choose_engine("auto", "cuda:1") == "torch"
    assert engines.choose_engine("auto", "cpu", "bf16") == engines.choose_engine("torch", "cpu") == "torch"
    monkeypatch.setattr(engines, "gpu_visible", lambda: True)
    assert engines.choose_engine("auto") == "torch" and engines.choose_engine("auto", "cpu") == (
        "onnx" if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx") else "torch")
    for device, precision, flag in (("cuda", "auto", "--device cuda"), ("cpu", "bf16", "--precision bf16")):
        with pytest.raises(ValueError, match=f"--engine onnx runs the fp32 export on the CPU: drop {flag}"):
            engines.choose_engine("onnx", device, precision)
    with pytest.raises(ValueError, match="--engine tensorrt: expected one of auto, torch, onnx"):
        engines.choose_engine("tensorrt")


@needs_ort
def test_caption_and_evaluate_take_engine(checkpoint, images, capsys, tiny_run):
    inputs = [str(p) for p in images]
    outputs = {}
    for engine in ("torch", "onnx", "auto"):
        assert main(["caption", "--checkpoint", str(checkpoint), "--precision", "fp32", "--engine", engine,
                     "--json", *inputs]) == 0
        outputs[engine] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert outputs["torch"] == outputs["onnx"] == outputs["auto"] and len(outputs["torch"]) == len(inputs)
    reports = {}
    for engine in ("torch", "onnx"):
        out = checkpoint.parent / f"{engine}.json"
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--precision", "fp32", "--engine", engine,
                     "--out", str(out)]) == 0
        reports[engine] = json.loads(out.read_text())
    assert reports["torch"]["predictions"] == reports["onnx"]["predictions"] and reports["onnx"]["predictions"]
    with pytest.raises(SystemExit):
        main(["caption", "--checkpoint", str(checkpoint), "--engine", "fast", inputs[0]])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


@needs_ort
def test_from_checkpoint_with_engine_onnx_and_a_reduced_precision_is_one_line(checkpoint, capsys, images):
    assert main(["caption", "--checkpoint", str(checkpoint), "--engine", "onnx", "--precision", "bf16",
                 str(images[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine onnx runs the fp32 export on the CPU: drop --precision bf16" in err[0], err
