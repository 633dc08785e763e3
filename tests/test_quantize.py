"""The int8 encoder: `export --quantize int8` quantizes encoder.onnx's ResNet statically, calibrated on
images of the run's training split (or of --calibration DIR), unless --encoder fp32.

Needs onnx and onnxruntime (the [export] extra); without them these tests are skipped.
"""
import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from captioning import Captioner
from captioning.cli.main import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or
                                importlib.util.find_spec("onnx") is None,
                                reason="onnx/onnxruntime not installed: pip install -e '.[export]'")


def graph(path):
    import onnx
    return onnx.load(path).graph


def quantized_convolutions(path) -> tuple[int, int]:
    """(convolutions whose weight is an int8 initializer read through DequantizeLinear, all convolutions)."""
    g = graph(path)
    int8 = {t.name for t in g.initializer if t.data_type == 3}             # TensorProto.INT8
    dequantized = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    convs = [n for n in g.node if n.op_type == "Conv"]
    return sum(n.input[1] in dequantized for n in convs), len(convs)


@pytest.fixture(scope="module")
def int8_exports(tiny_run, tmp_path_factory):
    from captioning.decode.export import export
    root = tmp_path_factory.mktemp("int8")
    export(tiny_run / "best.pt", root / "all", "int8")
    export(tiny_run / "best.pt", root / "fp32_encoder", "int8", encoder="fp32")
    return root


def test_quantize_int8_makes_every_resnet_convolution_int8_and_the_transformers_weights_8_bit(tiny_run,
                                                                                           int8_exports):
    done, total = quantized_convolutions(int8_exports / "all" / "encoder.onnx")
    assert total > 0 and done == total
    g = graph(int8_exports / "all" / "encoder.onnx")
    weights = {t.name for t in g.initializer}
    # every MatMul of a constant weight in 8 bits; the Gemm of each self-attention's packed input projection stays
    # fp32 (the quantizer packs MatMuls only; rewritten as MatMul + Add it ran no faster: docs/design.md)
    assert not [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in weights]
    packed = sum(n.op_type == "MatMulNBits" for n in g.node)       # the projection's and the transformer's
    assert packed > 0
    fp32_encoder = graph(int8_exports / "fp32_encoder" / "encoder.onnx")
    assert quantized_convolutions(int8_exports / "fp32_encoder" / "encoder.onnx") == (0, total)
    assert not any(n.op_type == "MatMulNBits" for n in fp32_encoder.node)
    train = json.loads((tiny_run / "splits.json").read_text())["train"]
    recipe = json.loads((int8_exports / "all" / "config.json").read_text())["int8"]["encoder"]
    assert recipe["calibration_images"] == min(256, len(train)) and recipe["format"] == "qdq"
    assert recipe["matmuls"] == f"{packed} in MatMulNBits, 8 bits, blocks of 128"
    assert recipe["weights"] == "int8, -64..64" and recipe["calibration"] == "minmax"
    assert json.loads((int8_exports / "fp32_encoder" / "config.json").read_text())["int8"]["encoder"] == "fp32"


def test_the_int8_convolution_weights_keep_within_7_bits_so_avx2_kernels_cannot_saturate(int8_exports):
    # without VNNI, ONNX Runtime's int8 convolutions sum each pair of uint8 x int8 products in a saturating int16
    # (VPMADDUBSW): 2 * 255 * 64 fits in it, 2 * 255 * 127 does not (docs/design.md)
    from onnx import numpy_helper
    g = graph(int8_exports / "all" / "encoder.onnx")
    conv_weights = {n.input[1] for n in g.node if n.op_type == "Conv"}
    int8 = {t.name: numpy_helper.to_array(t) for t in g.initializer if t.data_type == 3}      # TensorProto.INT8
    weights = [int8[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in int8
               and n.output[0] in conv_weights]
    assert weights and len(weights) == len(conv_weights)
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) > 32       # the range is used, not wasted


def test_the_int8_encoders_memory_is_close_to_fp32s_and_the_captions_mostly_agree(tiny_run, int8_exports, shapes_dir):
    images = sorted((shapes_dir / "flickr30k_images").iterdir())[:16]
    fp32, int8 = Captioner.from_export(int8_exports / "fp32_encoder"), Captioner.from_export(int8_exports / "all")
    x = np.stack([fp32.transform(Image.open(p)) for p in images])
    a, b = fp32.memory(images=x).reshape(len(x), -1), int8.memory(images=x).reshape(len(x), -1)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.98 and not np.allclose(a, b, atol=1e-4)            # int8, and close to fp32
    ours = Captioner.from_checkpoint(tiny_run / "best.pt", precision="fp32", engine="torch").caption(images)
    same = sum(r.caption == s.caption for r, s in zip(ours, int8.caption(images))) / len(images)
    assert same >= 0.75, same        # a barely trained tiny model; the Shapes model's figure is in docs


def test_calibration_images_are_a_seeded_sample_of_the_training_split(tiny_run):
    from captioning.decode.quantize import calibration_images
    from captioning.model.checkpoint import load_checkpoint
    _, _, cfg = load_checkpoint(tiny_run / "best.pt")
    splits = json.loads((tiny_run / "splits.json").read_text())
    picked = calibration_images(cfg, tiny_run / "best.pt", count=5)
    assert len(picked) == 5 and {p.name for p in picked} <= set(splits["train"])
    assert picked == calibration_images(cfg, tiny_run / "best.pt", count=5)                    # seeded
    assert picked != calibration_images(cfg, tiny_run / "best.pt", count=5, seed=1)
    assert len(calibration_images(cfg, tiny_run / "best.pt")) == len(splits["train"])           # all, when fewer


def test_calibration_images_default_count_is_the_module_setting_when_called(tiny_run, monkeypatch):
    from captioning.decode import quantize
    from captioning.model.checkpoint import load_checkpoint
    _, _, cfg = load_checkpoint(tiny_run / "best.pt")
    monkeypatch.setattr(quantize, "CALIBRATION_IMAGES", 3)       # what export_agreement.py --calibration-images sets
    assert len(quantize.calibration_images(cfg, tiny_run / "best.pt")) == 3


def test_calibration_dir_picks_its_own_images_and_a_run_without_splits_says_what_to_do(tiny_run, shapes_dir,
                                                                                      tmp_path):
    from captioning.decode.quantize import CalibrationError, calibration_images
    from captioning.model.checkpoint import load_checkpoint
    _, _, cfg = load_checkpoint(tiny_run / "best.pt")
    (tmp_path / "mine" / "deeper").mkdir(parents=True)
    for i, p in enumerate(sorted((shapes_dir / "flickr30k_images").iterdir())[:3]):
        (tmp_path / "mine" / ("deeper" if i else "") / p.name).write_bytes(p.read_bytes())
    (tmp_path / "mine" / "notes.txt").write_text("not an image")
    assert len(calibration_images(cfg, tiny_run / "best.pt", tmp_path / "mine")) == 3
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes((tiny_run / "best.pt").read_bytes())
    elsewhere = dataclasses.replace(cfg, run_dir=str(tmp_path / "nowhere"))
    with pytest.raises(CalibrationError, match="no splits.json .* --calibration DIR.* --encoder fp32"):
        calibration_images(elsewhere, tmp_path / "run" / "best.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no image file found in --calibration"):
        calibration_images(cfg, tiny_run / "best.pt", tmp_path / "empty")


def test_cli_export_with_calibration_dir_and_the_flags_that_do_not_go_together(tiny_run, shapes_dir, tmp_path,
                                                                              capsys):
    ck, images = str(tiny_run / "best.pt"), str(shapes_dir / "flickr30k_images")
    assert main(["export", "--checkpoint", ck, "--out", str(tmp_path / "e"), "--quantize", "int8",
                 "--calibration", images]) == 0
    out = capsys.readouterr().out
    assert "the encoder int8 too (calibrated on " in out and "caption --model" in out
    recipe = json.loads((tmp_path / "e" / "config.json").read_text())["int8"]["encoder"]
    assert recipe["calibration_images"] == min(256, len(list((shapes_dir / "flickr30k_images").iterdir())))
    for flags, complaint in ((["--encoder", "int8"], "--encoder int8 goes with --quantize int8"),
                             (["--quantize", "int8", "--encoder", "fp32", "--calibration", images],
                              "only the int8 encoder is calibrated")):
        assert main(["export", "--checkpoint", ck, "--out", str(tmp_path / "x"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and complaint in err[0], err
        assert not (tmp_path / "x").exists()


def test_an_int8_export_with_full_range_weights_warns_where_the_int8_sums_can_saturate(int8_exports, tmp_path,
                                                                                      monkeypatch, caplog):
    import shutil

    from captioning.decode import onnx_engine
    old = tmp_path / "old"
    shutil.copytree(int8_exports / "all", old)
    meta = json.loads((old / "config.json").read_text())
    meta["int8"]["encoder"]["weights"] = "int8"                      # what exports made before -64..64 say
    (old / "config.json").write_text(json.dumps(meta))
    for saturates, folder, warned in ((True, old, True), (False, old, False), (True, int8_exports / "all", False)):
        monkeypatch.setattr(onnx_engine, "int8_sums_saturate", lambda s=saturates: s)
        caplog.clear()
        Captioner.from_export(folder)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(warnings) == warned, (saturates, folder, warnings)
        if warned:
            assert str(old) in warnings[0] and "export the checkpoint again" in warnings[0]


def test_int8_sums_saturate_only_on_x86_without_vnni(monkeypatch):
    from captioning.decode import onnx_engine
    monkeypatch.setattr(onnx_engine.platform, "machine", lambda: "aarch64")
    assert onnx_engine.int8_sums_saturate() is False                 # ARM's dot products are exact
