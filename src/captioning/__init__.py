"""Image captioning: a frozen ResNet encoder and a torch.nn.Transformer decoder.

Data flows one way: reader -> vocabulary -> dataset -> model -> loss -> checkpoint;
checkpoint -> Captioner -> images -> encoder -> search through an engine -> text.
The subpackages follow it: data, model, decode, then captioner, eval, train, serve and cli
(CONTRIBUTING.md).

`import captioning` does not import torch: the names that need it (CaptionModel, build_model,
load_checkpoint) import it on first use, so captioning from an export runs without it.
"""
from .captioner import Captioner, CaptionResult
from .config import Config, ConfigError, load_config
from .data.images import ImageLimits, ImageLoadError, open_image
from .data.vocab import Vocabulary

_WITH_TORCH = {"CaptionModel": "model.caption_model", "build_model": "model.caption_model",
               "load_checkpoint": "model.checkpoint"}

__all__ = ["CaptionModel", "CaptionResult", "Captioner", "Config", "ConfigError", "ImageLimits",
           "ImageLoadError", "Vocabulary", "build_model", "load_checkpoint", "load_config",
           "open_image"]
__version__ = "0.1.0"    # pyproject.toml's; env.json records the installed one


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WITH_TORCH))


def __getattr__(name: str):
    if name in _WITH_TORCH:
        import importlib

        return getattr(importlib.import_module(f".{_WITH_TORCH[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
