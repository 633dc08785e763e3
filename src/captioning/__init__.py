"""Image captioning: a frozen ResNet encoder and a torch.nn.Transformer decoder.

Data flows one way: reader -> vocabulary -> dataset -> model -> loss -> checkpoint;
checkpoint -> Captioner -> images -> encoder -> decoding -> text.
"""
from .captioner import Captioner, CaptionResult
from .checkpoint import load_checkpoint
from .config import Config, ConfigError, load_config
from .images import ImageLimits, ImageLoadError, open_image
from .model import CaptionModel, build_model
from .vocab import Vocabulary

__all__ = ["CaptionModel", "CaptionResult", "Captioner", "Config", "ConfigError", "ImageLimits", "ImageLoadError",
           "Vocabulary", "build_model", "load_checkpoint", "load_config", "open_image"]
__version__ = "0.1.0"
