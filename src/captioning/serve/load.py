"""The one place `serve` loads its model: a checkpoint (ONNX Runtime on a CPU by default, through
the export cache; PyTorch elsewhere), a model folder or hub id, or an export."""
from __future__ import annotations

from pathlib import Path

from ..captioner import Captioner
from ..data.images import ImageLimits


def load(checkpoint: str | Path | None = None, model: str | Path | None = None, *,
         limits: ImageLimits | None = None, device=None, threads: int | None = None) -> Captioner:
    """The served Captioner: `checkpoint` (a .pt file or a run directory) or `model` (a model
    folder `save` wrote, its hub id, or a folder `export` wrote); `limits` bound what one
    request's image may be."""
    if (checkpoint is None) == (model is None):
        raise ValueError("serve needs one model: --checkpoint CKPT or --model DIR")
    if model is not None:
        return Captioner.from_pretrained(model, device=device, limits=limits, threads=threads)
    return Captioner.from_checkpoint(checkpoint, device=device, limits=limits)


def describe_model(captioner: Captioner, source: str | Path) -> dict:
    """What /v1/info and the page say about the model."""
    m = captioner.cfg.model
    engine = "onnxruntime" if "onnx" in type(captioner.encoder).__module__ else "pytorch"
    return {"source": Path(source).name, "engine": engine, "backbone": m.backbone,
            "d_model": m.d_model,
            "layers": [m.num_encoder_layers, m.num_decoder_layers], "heads": m.num_heads,
            "vocabulary": len(captioner.vocab), "image_size": captioner.cfg.data.image_size,
            "max_words": captioner.cfg.data.max_words}
