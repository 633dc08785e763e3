"""The captioner: images -> encoder -> decoding -> text, over a checkpoint (PyTorch) or an export
(ONNX Runtime). `Captioner` is the one prediction path of `caption`, `evaluate`, validation CIDEr
and `serve`."""
from .captioner import Captioner, CaptionResult

__all__ = ["CaptionResult", "Captioner"]
