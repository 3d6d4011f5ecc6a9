"""Model registry (an allow-list, as timm's create_model) and the normalising wrapper that gets exported."""
from __future__ import annotations

import torch
from torch import nn

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
    pixels and a phone only has to crop, resize and divide by 255.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def create_model(arch: str, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Classifier:
    return Classifier(create_backbone(arch, num_classes), mean, std)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
