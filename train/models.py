"""Model registry (an allow-list, as timm's create_model) and the normalising wrapper that gets exported."""
from __future__ import annotations

import torch
from torch import nn

from train.preprocess import INPUT_NORMS

# name -> (library, constructor name, the input size the paper reports FLOPs at)
ARCHS: dict[str, tuple[str, str, int]] = {
    "mobilevit_xxs": ("timm", "mobilevit_xxs", 256),
    "mobilevit_xs": ("timm", "mobilevit_xs", 256),
    "mobilevit_s": ("timm", "mobilevit_s", 256),
    "resnet50": ("torchvision", "resnet50", 224),
    "densenet121": ("torchvision", "densenet121", 224),
    "mobilenet_v2": ("torchvision", "mobilenet_v2", 224),
    "mobilenet_v3_large": ("torchvision", "mobilenet_v3_large", 224),
}


class UnknownArchError(ValueError):
    pass


def check_arch(name: str) -> str:
    if name not in ARCHS:
        raise UnknownArchError(f"unknown architecture {name!r}; valid: {', '.join(ARCHS)}")
    return name


def create_backbone(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised network (the paper trains de novo; no weights are downloaded)."""
    lib, ctor, _ = ARCHS[check_arch(name)]
    if lib == "timm":
        import timm

        return timm.create_model(ctor, pretrained=False, num_classes=num_classes)
    import torchvision

    return getattr(torchvision.models, ctor)(weights=None, num_classes=num_classes)


class Classifier(nn.Module):
    """[B, 3, S, S] float32 RGB in 0..1 -> [B, num_classes] logits.

    Normalisation lives in the graph (as buffers), so every exported format takes plain 0..1
    pixels and a phone only has to crop, resize and divide by 255. `input_norm`:

    - "imagenet": (x - mean) / std with fixed constants (the paper's, and every model before the
      cross-lab work);
    - "od_instance": stain normalisation per image: optical density -log(x) (light absorbed by the
      dyes: Beer-Lambert makes a lamp's or camera's colour cast, and a stain's strength, a per-channel
      offset and scale there), then each channel standardised over the image. Another lab's yellow
      background, paler stain or brighter lamp then reach the network much as PBC's do;
    - "rgb_instance": the same standardisation on the pixel values themselves.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 input_norm: str = "imagenet"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
        self.backbone = backbone
        self.input_norm = input_norm
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] float32 in 0..1 -> [B, 3, S, S] float32, what the backbone sees."""
        if self.input_norm == "imagenet":
            return (x - self.mean) / self.std
        if self.input_norm == "od_background":
            # white-balanced optical density: each channel's background (its clearest 5x5 region) is zero, and one
            # scale for all channels keeps the ratios between them (the stain's hue) that od_instance equalises
            od = -torch.log(x.clamp(min=1.0 / 255.0))
            bg = torch.nn.functional.avg_pool2d(od, 5, stride=1).amin(dim=(2, 3), keepdim=True)
            od = od - bg
            mu = od.mean(dim=(1, 2, 3), keepdim=True)
            sd = (od - mu).pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-4).sqrt()
            return (od - mu) / sd
        if self.input_norm == "od_instance":
            x = -torch.log(x.clamp(min=1.0 / 255.0))  # optical density, 0 (white) .. 5.5 (black)
        mu = x.mean(dim=(2, 3), keepdim=True)
        sd = (x - mu).pow(2).mean(dim=(2, 3), keepdim=True).add(1e-4).sqrt()
        return (x - mu) / sd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalise(x))


def create_model(arch: str, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
                 input_norm: str = "imagenet") -> Classifier:
    return Classifier(create_backbone(arch, num_classes), mean, std, input_norm)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
