"""The image encoder: a torchvision ResNet without its pooling and classifier -> grid features
(B, h*w, C)."""
from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..config import EnvironmentProblem


class Encoder(nn.Module):
    """A torchvision ResNet up to stage `stages` (4 = all of it); frozen unless `trainable`.

    The submodules keep torchvision's names (conv1, bn1, layer1, ...), so
    ImageNet weights load with strict=True. Fewer stages give a finer grid
    (stride 8 after layer2, 16 after layer3, 32 after layer4) and a network
    that trains from scratch far faster: the embedded Shapes default uses that.
    """

    def __init__(self, backbone: str = "resnet152", pretrained: bool = True,
                 trainable: bool = False, stages: int = 4):
        super().__init__()
        resnet = _resnet(backbone, pretrained)
        dropped = ("avgpool", "fc") + tuple(f"layer{i}" for i in range(stages + 1, 5))
        self.body = nn.Sequential(OrderedDict((k, v) for k, v in resnet.named_children()
                                              if k not in dropped))
        last = getattr(resnet, f"layer{stages}")
        self.out_channels = [m for m in last.modules()
                             if isinstance(m, nn.BatchNorm2d)][-1].num_features
        self.trainable = trainable
        if not trainable:
            self.body.requires_grad_(False)
            self.body.eval()

    def train(self, mode: bool = True):
        # a frozen encoder keeps its BatchNorm statistics: always in eval mode
        return super().train(mode and self.trainable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.body(images)                    # (B, C, h, w)
        return grid.flatten(2).transpose(1, 2)      # (B, h*w, C)

    @torch.no_grad()
    def folded(self) -> Encoder:
        """A frozen eval-mode copy that gives the same features with every BatchNorm folded into the
        convolution it follows (weights scaled by gamma / sqrt(running_var + eps), a bias added).

        For running the ResNet many times, as feature extraction does: the BatchNorm passes over
        the activations are gone. The fold is computed in fp32 whatever this module's dtype, and the
        copy gets that dtype back. This module is left as it is, its state_dict keys included.
        """
        from torchvision.models.resnet import BasicBlock, Bottleneck

        if self.trainable:
            raise ValueError("only a frozen encoder can be folded: "
                             "a trained one's BatchNorm statistics change")
        dtype = next(self.parameters()).dtype
        encoder = copy.deepcopy(self).float().eval()
        for module in list(encoder.body.modules()):
            if type(module) in (BasicBlock, Bottleneck):    # forward: bn{i}(conv{i}(x)), by name
                for i in (1, 2, 3):
                    if hasattr(module, f"bn{i}"):
                        conv, bn = getattr(module, f"conv{i}"), getattr(module, f"bn{i}")
                        setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                        setattr(module, f"bn{i}", nn.Identity())
            elif isinstance(module, nn.Sequential):         # the stem and each downsample
                for i in range(1, len(module)):
                    if isinstance(module[i], nn.BatchNorm2d) and \
                            isinstance(module[i - 1], nn.Conv2d):
                        module[i - 1], module[i] = (fuse_conv_bn_eval(module[i - 1], module[i]),
                                                    nn.Identity())
        left = [name for name, m in encoder.named_modules() if isinstance(m, nn.BatchNorm2d)]
        if left:
            raise NotImplementedError("BatchNorm layers not after a convolution, "
                                      f"cannot fold: {left[:3]}")
        return encoder.to(dtype).requires_grad_(False)


class WeightsUnavailableError(EnvironmentProblem):
    """torchvision's ImageNet weights could not be downloaded (offline machine, proxy, ...)."""


def _resnet(backbone: str, pretrained: bool) -> nn.Module:
    """torchvision's ResNet, with its ImageNet weights when `pretrained` (downloaded once into
    torch's cache)."""
    import torchvision  # here, not at the top: captioning from an ONNX export never loads it

    if not pretrained:
        return torchvision.models.get_model(backbone, weights=None)
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:
        return torchvision.models.get_model(backbone, weights=weights)
    except (OSError, ConnectionError) as e:               # urllib's URLError is an OSError
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(weights.url).path).name
        raise WeightsUnavailableError(
            f"could not download torchvision's ImageNet weights for {backbone} "
            f"({getattr(e, 'reason', e)}): copy {weights.url} to {cached} (torchvision's cache), "
            "or train without them: --set model.pretrained=false") from None

