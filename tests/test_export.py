"""ONNX export: the exported graphs caption as the checkpoint does, through the same Captioner and search code.

Needs onnx and onnxruntime (`pip install -e '.[export]'`, which the dev extra includes); without them these
tests are skipped, except the one that checks the CLI says what to install.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from captioning import Captioner
from captioning.cli.main import main

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or
                               importlib.util.find_spec("onnx") is None,
                               reason="onnx/onnxruntime not installed: pip install -e '.[export]'")


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    """The tiny trained run exported twice: fp32 and int8."""
    from captioning.decode.export import export
    root = tmp_path_factory.mktemp("exports")
    for quantize in (None, "int8"):
        export(tiny_run / "best.pt", root / (quantize or "fp32"), quantize)
    return root


@pytest.fixture(scope="module")
def images(shapes_dir):
    return sorted((shapes_dir / "flickr30k_images").iterdir())[:16]


@needs_ort
def test_the_fp32_export_gives_the_checkpoints_captions(tiny_run, exports, images):
    ours = Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32", engine="torch")
    onnx = Captioner.from_export(exports / "fp32")
    for options in ({}, {"beam_size": 3, "num_captions": 2}, {"temperature": 1.0, "top_k": 5, "seed": 3}):
        a, b = ours.caption(images, **options), onnx.caption(images, **options)
        assert [r.caption for r in a] == [r.caption for r in b], options
        assert [[c["caption"] for c in r.captions] for r in a] == [[c["caption"] for c in r.captions] for r in b]
        np.testing.assert_allclose([c["logprob"] for r in a for c in r.captions],
                                   [c["logprob"] for r in b for c in r.captions], atol=1e-3)


@needs_ort
def test_the_export_gives_attention_maps_of_the_same_shape_and_values(tiny_run, exports, images):
    a = Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32", engine="torch").caption(images[:3],
                                                                                                attention=True)
    b = Captioner.from_export(exports / "fp32").caption(images[:3], attention=True, batch_size=2)
    for x, y in zip(a, b):
        assert x.words == y.words and x.attention.shape == y.attention.shape
        np.testing.assert_allclose(x.attention, y.attention, atol=1e-5)


@needs_ort
def test_the_int8_export_has_8_bit_decoder_weights_a_static_int8_encoder_and_keeps_most_captions(tiny_run, exports,
                                                                                                images):
    import onnx

    def weight_products(path) -> tuple[int, int]:
        """(fp32 MatMuls whose weight is an initializer, 8-bit MatMulNBits) of a graph."""
        graph = onnx.load(path).graph
        weights = {t.name for t in graph.initializer}
        return (sum(n.op_type == "MatMul" and n.input[1] in weights for n in graph.node),
                sum(n.op_type == "MatMulNBits" and n.attribute[[a.name for a in n.attribute].index("bits")].i == 8
                    for n in graph.node))

    for name in ("start.onnx", "step.onnx"):           # every product with a weight, the output layer's too
        fp32, _ = weight_products(exports / "fp32" / name)
        assert fp32 > 0 and weight_products(exports / "int8" / name) == (0, fp32)
    ops = {n.op_type for n in onnx.load(exports / "int8" / "encoder.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMulNBits"} <= ops     # test_quantize.py: which nodes
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(exports / "fp32" / "encoder.onnx").graph.node}
    shortlist = [{"TopK", "ScatterElements"} <= {n.op_type for n in onnx.load(exports / kind / "step.onnx").graph.node}
                 for kind in ("fp32", "int8")]
    assert shortlist == [False, True]                  # the int8 step rescores its best words with fp32 weights
    meta = json.loads((exports / "int8" / "config.json").read_text())
    assert meta["quantize"] == "int8" and meta["check"]["int8"]["relative"] <= meta["check"]["int8"]["tolerance"]
    ours = Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32", engine="torch").caption(images)
    int8 = Captioner.from_export(exports / "int8").caption(images)
    assert sum(a.caption == b.caption for a, b in zip(ours, int8)) >= 0.75 * len(images)


def test_a_shortlisted_step_rescores_its_best_words_with_the_exact_weights(tiny_run):
    """_Step's shortlist: whatever the (quantized) output layer gives, its k best words get the fp32 logits."""
    from captioning.decode.export import _Step
    from captioning.model.caption_model import init_cache
    from captioning.model.checkpoint import load_checkpoint

    model, _, cfg = load_checkpoint(tiny_run / "best.pt")
    model, size, exact = model.float().eval(), cfg.data.image_size, _Step(model)
    weight, bias = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    noise = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = init_cache(model, model.encode(torch.randn(2, 3, size, size)))
        args = (torch.tensor([1, 5]), torch.tensor(0), *cache.self_k, *cache.self_v, *cache.cross_k, *cache.cross_v)
        want = exact(*args)[0]
        model.head.forward = lambda h: torch.nn.functional.linear(h, weight + noise, bias)   # "int8", head.weight exact
        rough, rescored = _Step(model)(*args)[0], _Step(model, shortlist=3)(*args)[0]
    top = rough.topk(3, dim=-1).indices
    torch.testing.assert_close(rescored.gather(1, top), want.gather(1, top))
    rest = torch.ones_like(rough, dtype=torch.bool).scatter(1, top, False)
    assert torch.equal(rescored[rest], rough[rest]) and not torch.allclose(rough.gather(1, top), want.gather(1, top))


@needs_ort
def test_the_preprocessing_without_torchvision_is_build_transforms(exports, images):

    from captioning.data.dataset import build_transform
    onnx = Captioner.from_export(exports / "fp32")
    for image in (Image.open(images[0]).convert("RGB"), Image.new("RGB", (500, 375), (200, 30, 90))):
        ours = torch.from_numpy(onnx.transform(image))
        torch.testing.assert_close(ours, build_transform(onnx.cfg.data.image_size)(image))


@needs_ort
def test_a_failed_check_leaves_nothing_behind(tiny_run, tmp_path, monkeypatch):
    from captioning.decode import export as export_module
    monkeypatch.setitem(export_module.TOLERANCE, None, -1.0)
    with pytest.raises(export_module.ExportCheckError, match="nothing was written"):
        export_module.export(tiny_run / "best.pt", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@needs_ort
def test_export_refuses_a_folder_with_files_in_it(tiny_run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "out" / "notes.txt").read_text() == "mine"


@needs_ort
def test_an_incomplete_export_is_named(exports, tmp_path, capsys):
    import shutil
    shutil.copytree(exports / "fp32", tmp_path / "broken")
    (tmp_path / "broken" / "step.onnx").unlink()
    assert main(["caption", "--model", str(tmp_path / "broken"), "x.png"]) == 2
    err = capsys.readouterr().err
    assert "step.onnx" in err and "export --checkpoint" in err


@needs_ort
def test_cli_export_then_caption_with_model(tiny_run, images, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(tmp_path / "e")]) == 0
    assert "caption --model" in capsys.readouterr().out
    inputs = [str(p) for p in images[:4]]
    assert main(["caption", "--model", str(tmp_path / "e"), "--json", *inputs]) == 0
    onnx = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["caption", "--checkpoint", str(tiny_run / "best.pt"), "--precision", "fp32", "--engine", "torch",
                 "--json", *inputs]) == 0
    assert onnx == [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@needs_ort
def test_an_exports_arrays_are_numpy_and_its_search_still_takes_a_tensor(exports, images):
    onnx = Captioner.from_export(exports / "fp32")
    memory = onnx.encode([Image.open(p).convert("RGB") for p in images[:3]])
    assert isinstance(memory, np.ndarray) and onnx.decode(torch.from_numpy(memory)) == onnx.decode(memory)


@needs_ort
def test_an_exports_session_threads_spin_within_a_run_and_stop_after_it(exports, images, monkeypatch):
    from captioning.decode import onnx_engine

    def settings(captioner):
        sessions = (captioner.encoder.session, captioner.engine.start, captioner.engine.step_session)
        return {(s.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"),
                 s.get_session_options().get_session_config_entry("session.force_spinning_stop")) for s in sessions}

    spinning = Captioner.from_export(exports / "int8")
    assert settings(spinning) == {("1", "1")}
    monkeypatch.setattr(onnx_engine, "SPIN_WITHIN_RUN", False)     # what benchmarks/session_threads.py compares
    never = Captioner.from_export(exports / "int8")
    assert settings(never) == {("0", "1")}
    assert [r.caption for r in never.caption(images[:4])] == [r.caption for r in spinning.caption(images[:4])]


def test_threads_do_not_spin_where_they_would_outnumber_the_cpus_or_when_told_not_to(tmp_path, monkeypatch):
    from captioning.decode import onnx_engine

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(onnx_engine, "CGROUP_CPU_MAX", tmp_path / "cpu.max")      # none: no quota
    assert onnx_engine.spins(cpus) and not onnx_engine.spins(cpus + 1)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert onnx_engine.usable_cpus() == cpus
    (tmp_path / "cpu.max").write_text("50000 100000\n")                              # half a CPU's time
    assert onnx_engine.usable_cpus() == 0.5 and not onnx_engine.spins(1)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    monkeypatch.setenv(onnx_engine.SPIN_ENV, "0")
    assert not onnx_engine.spins(1)


@needs_ort
def test_captioning_from_an_export_imports_neither_torch_nor_torchvision_nor_pandas_nor_matplotlib(exports, images):
    code = ("import sys; from captioning import Captioner; "
            f"c = Captioner.from_export({str(exports / 'int8')!r}); print(c({str(images[0])!r}) != ''); "
            f"c.caption([{str(images[1])!r}], beam_size=2, attention=True); "
            f"c.caption([{str(images[1])!r}], temperature=1.0, top_p=0.9, seed=0); "
            "from captioning.cli.main import main; "
            f"assert main(['caption', '--model', {str(exports / 'int8')!r}, {str(images[2])!r}]) == 0; "
            "print(sorted(m for m in ('torch', 'torchvision', 'pandas', 'matplotlib') if m in sys.modules))")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert lines[0] == "True" and len(lines[1].split("\t")) == 2 and lines[2] == "[]", lines   # the CLI's caption


def test_export_without_onnx_says_what_to_install(tiny_run, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else
                        real(name, *a))
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[export]'" in err[0], err
    assert not (tmp_path / "e").exists()


@needs_ort
def test_an_int8_export_on_too_old_an_onnxruntime_says_what_to_upgrade(exports, monkeypatch):
    import onnxruntime

    from captioning.decode.onnx_engine import ExportError
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.1")
    with pytest.raises(ExportError, match=r"need onnxruntime 1.22 or newer .* this is 1.21.1: pip install -U"):
        Captioner.from_export(exports / "int8")
    assert Captioner.from_export(exports / "fp32").precision == "fp32"        # fp32 graphs run on older ones
