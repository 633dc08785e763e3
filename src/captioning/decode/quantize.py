"""int8: the decoder's and encoder's matrix products in 8-bit blocks, and the encoder's ResNet
quantized statically, calibrated on real images.

A matrix product with a constant weight is bound by reading that weight (a decoding step reads every
decoder weight once per word), so `pack_matmuls` stores each as ONNX Runtime's MatMulNBits: 8 bits,
symmetric, a scale per `block` input rows of each output column, computed in int8 (accuracy level 4:
activations quantized per block on the fly). Products without a constant weight (q k^T, w v) stay
fp32.

A convolution's cost is its multiply-adds, not its weight bytes, so int8 pays only when the
activations are int8 too: static quantization fixes each activation's range beforehand, from
images run through the fp32 graph (calibration), and ONNX Runtime then runs the convolutions as
int8 kernels (QLinearConv; VNNI where the CPU has it). Only the ResNet's nodes are quantized so
(convolutions, their ReLUs, the residual additions, the max pooling); the projection to d_model and
the transformer encoder after it get 8-bit weights as the decoder's do (`pack_matmuls`), their
activations quantized per block as they come rather than to calibrated ranges.

The recipe (docs/design.md says why): QDQ format, int8 weights with a scale per output channel in
7 bits' range (-64..64: `REDUCE_RANGE`), uint8 activations with ranges from min/max over the
calibration images. The 7-bit range keeps an export's captions the same with and without VNNI:
without it (AVX2 alone) ONNX Runtime's int8 convolutions add each pair of uint8 x int8 products in a
saturating int16 (VPMADDUBSW), and 255 * 127 * 2 overflows it where 255 * 64 * 2 does not
(benchmarks/cpu_portability.py: on an emulated AVX2 CPU 1 of 600 Shapes captions differs, 20 with
the full int8 range).

    calibration_images(cfg, checkpoint)     a seeded sample of the run's training images
    calibration_images(cfg, ckpt, "DIR")    ... or of the image files in DIR
    quantize_encoder(src, dst, images, pre, block)
                                            encoder.onnx (fp32) -> dst (int8 ResNet, 8-bit
                                            transformer weights)
    pack_matmuls(src, dst, block)           a graph's constant-weight MatMuls -> MatMulNBits
"""
from __future__ import annotations

import contextlib
import logging
import random
import tempfile
from pathlib import Path

import numpy as np

from ..config import Config
from ..data.corpus import load_splits
from ..data.images import IMAGE_EXTENSIONS, ImageLoadError, open_image
from .onnx_engine import preprocess, require_onnx

log = logging.getLogger(__name__)
CALIBRATION_IMAGES = 256   # a few hundred: the ranges settle well before that (docs/design.md)
CALIBRATION_BATCH = 8      # images a calibration run (the augmented graph is run per batch)
# the recipe, module-level so that benchmarks/export_agreement.py can compare others
FORMAT = "qdq"             # or "qoperator"
PER_CHANNEL = True
REDUCE_RANGE = True        # int8 weights within -64..64: no int16 saturation on CPUs without VNNI
CALIBRATION_METHOD = "minmax"   # or "percentile" (quantize_static's)
ACTIVATIONS = "uint8"      # or "int8"
ACCURACY_LEVEL = 4         # MatMulNBits' compute: 4 = int8 (activations quantized per block)
ENCODER_NODES = "/encoder/body/"  # the ResNet's nodes (the names the TorchScript exporter gives)


# --calibration-method's names -> onnxruntime's CalibrationMethod members. Not Entropy: through
# quantize_static its histogram has as many bins as the quantized range (128), so it picks the
# min/max ranges; with 2,048 bins it clipped so much that Shapes kept 85% of its test captions
# (docs/design.md)
METHODS = {"minmax": "MinMax", "percentile": "Percentile"}


class CalibrationError(ValueError):
    """No calibration images: the message names where they were looked for and what to do."""


def calibration_images(cfg: Config, checkpoint: str | Path, folder: str | Path | None = None,
                       count: int | None = None, seed: int = 0) -> list[Path]:
    """`count` image files (None: CALIBRATION_IMAGES), a seeded sample: of `folder` (every image
    file in it, recursively), or else of the run's training split (splits.json beside the
    checkpoint or in cfg.run_dir, names under cfg.data.images). CalibrationError when there are
    none."""
    count = CALIBRATION_IMAGES if count is None else count
    hint = ("name a folder of images with --calibration DIR, or keep the encoder fp32 with "
            "--encoder fp32")
    if folder is not None:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise CalibrationError(f"--calibration {folder}: not a folder")
        paths = sorted(p for p in folder.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        where = f"--calibration {folder}"
    else:
        splits = [Path(checkpoint).parent / "splits.json", Path(cfg.run_dir) / "splits.json"]
        found = next((p for p in splits if p.is_file()), None)
        if found is None:
            raise CalibrationError(f"the int8 encoder is calibrated on the run's training images, "
                                   f"but there is no splits.json beside {checkpoint} or in "
                                   f"{cfg.run_dir}: {hint}")
        images = Path(cfg.data.images).expanduser()
        paths = [images / name for name in load_splits(found).get("train", [])]
        paths = [p for p in paths if p.is_file()]
        where = f"the training split of {found} (images in {images})"
    if not paths:
        raise CalibrationError(f"no image file found in {where}: {hint}")
    return sorted(random.Random(seed).sample(paths, min(count, len(paths))))


class _Reader:
    """onnxruntime's CalibrationDataReader: the images, preprocessed as OrtEncoder does, a batch
    at a time (an unreadable file is skipped with a warning)."""

    def __init__(self, paths: list[Path], pre: dict):
        self.paths, self.pre, self.start, self.used = paths, pre, 0, 0

    def get_next(self) -> dict | None:
        batch = []
        while not batch and self.start < len(self.paths):
            for path in self.paths[self.start:self.start + CALIBRATION_BATCH]:
                try:
                    batch.append(preprocess(open_image(path), self.pre["image_size"],
                                            self.pre["mean"], self.pre["std"]))
                except ImageLoadError as e:
                    log.warning("calibration: %s", e)
            self.start += CALIBRATION_BATCH
        self.used += len(batch)
        return {"images": np.stack(batch)} if batch else None

    def rewind(self) -> None:
        self.start = 0


@contextlib.contextmanager
def _quiet():
    """The root logger at ERROR for a while: the quantizers log every node they touch."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def pack_matmuls(src: Path, dst: Path, block: int, external_data: bool = False) -> int:
    """The graph `src` -> `dst` with every MatMul whose weight is a constant stored as MatMulNBits
    (8 bits, symmetric, a scale per `block` input rows, int8 compute); the number packed.
    `external_data`: the weights in dst.data beside it."""
    require_onnx("export --quantize int8", "onnx", "onnxruntime", "onnx_ir")
    import onnx
    import onnxruntime.quantization.matmul_nbits_quantizer as nbits

    with _quiet():
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True,
                                                    accuracy_level=ACCURACY_LEVEL, bits=8,
                                                    op_types_to_quantize=("MatMul",))
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(src), bits=8, block_size=block,
                                               is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                               algo_config=config)
        quantizer.process()
        graph = quantizer.model.model.graph
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=external_data)
    return sum(n.op_type == "MatMulNBits" for n in graph.node)


def quantize_encoder(src: Path, dst: Path, images: list[Path], pre: dict, block: int) -> dict:
    """encoder.onnx `src` (fp32) -> `dst` with its ResNet in int8, calibrated on `images`
    (preprocessed as `pre`, preprocess.json's), and its other matrix products in 8-bit blocks of
    `block` rows; the recipe, for config.json."""
    require_onnx("export --quantize int8 (the encoder)", "onnx", "onnxruntime")
    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            # ONNX Runtime's own advice before quantize_static: shapes inferred, graph simplified
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True,
                              save_as_external_data=True, all_tensors_to_one_file=True,
                              external_data_location="prepared.onnx.data")
            graph = onnx.load(prepared, load_external_data=False).graph
            nodes = [n.name for n in graph.node if n.name.startswith(ENCODER_NODES)]
            if not nodes:
                raise ValueError(f"{src}: no node named {ENCODER_NODES}*: nothing to quantize")
            reader = _Reader(images, pre)
            activation = q.QuantType.QUInt8 if ACTIVATIONS == "uint8" else q.QuantType.QInt8
            static = Path(tmp) / "static.onnx"
            q.quantize_static(
                str(prepared), str(static), reader,
                quant_format=q.QuantFormat.QDQ if FORMAT == "qdq" else q.QuantFormat.QOperator,
                per_channel=PER_CHANNEL, reduce_range=REDUCE_RANGE, activation_type=activation,
                weight_type=q.QuantType.QInt8, nodes_to_quantize=nodes,
                calibrate_method=getattr(q.CalibrationMethod, METHODS[CALIBRATION_METHOD]),
                use_external_data_format=True)
            if not reader.used:
                raise CalibrationError(f"none of the {len(images)} calibration images could be "
                                       "read")
            packed = pack_matmuls(static, dst, block, external_data=True)
    return {"encoder": "static", "format": FORMAT, "per_channel": PER_CHANNEL,
            "weights": "int8, -64..64" if REDUCE_RANGE else "int8", "activations": ACTIVATIONS,
            "calibration": CALIBRATION_METHOD, "calibration_images": reader.used,
            "matmuls": f"{packed} in MatMulNBits, 8 bits, blocks of {block}"}
