"""Model registry (an allow-list, as timm's create_model) and the normalising wrapper that gets exported."""
from __future__ import annotations

import math

import torch
from torch import nn

from train.preprocess import INPUT_NORMS

# Test-time augmentation folded into the graph (export --tta): "dihedral8" averages the logits over the 8 rotations and
# mirrors of the square input. A cell has no "up" on a slide, so the answer should not depend on how the phone was held.
TTA_MODES = ("none", "dihedral8")

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


def check_tta(name: str) -> str:
    if name not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {name!r}; valid: {', '.join(TTA_MODES)}")
    return name


def check_arch(name: str) -> str:
    if name not in ARCHS:
        raise UnknownArchError(f"unknown architecture {name!r}; valid: {', '.join(ARCHS)}")
    return name


def create_backbone(name: str, num_classes: int, drop_path: float = 0.0) -> nn.Module:
    """A randomly initialised network (the paper trains de novo; no weights are downloaded).

    drop_path: timm's stochastic depth rate (training only: eval and export run every block, and the weights'
    names are the same, so a checkpoint loads with or without it).
    """
    lib, ctor, _ = ARCHS[check_arch(name)]
    if lib == "timm":
        import timm

        return timm.create_model(ctor, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)
    if drop_path:
        raise ValueError(f"drop_path is implemented for the timm networks only, not {name!r}")
    import torchvision

    return getattr(torchvision.models, ctor)(weights=None, num_classes=num_classes)


class InputNorm(nn.Module):
    """The input normalisation of Classifier (see there), as a module without parameters or saved state.

    Being a module gives its operations a name in every exported graph ("norm"), so the int8 exports leave them
    in fp32: a sharpness measure, a high-pass or a background level is a small difference of pixel values that
    8 bits would lose. It holds no tensors, so checkpoints stay as they were.
    """

    def __init__(self, input_norm: str):
        super().__init__()
        self.input_norm = input_norm

    def forward(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] float32 in 0..1 -> [B, 3, S, S] float32, what the backbone sees."""
        if self.input_norm == "imagenet":
            return (x - mean) / std
        if self.input_norm == "od_sharp":
            x = sharpen_soft(x)
        if self.input_norm in ("od_background", "od_gray", "od_aligned", "od_sharp"):
            # white-balanced optical density: each channel's background (its clearest 5x5 region) is zero, and one
            # scale for all channels keeps the ratios between them (the stain's hue) that od_instance equalises
            od = -torch.log(x.clamp(min=1.0 / 255.0))
            bg = torch.nn.functional.avg_pool2d(od, 5, stride=1).amin(dim=(2, 3), keepdim=True)
            od = od - bg
            if self.input_norm == "od_gray":
                od = od.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)  # [B, 1, S, S] -> [B, 3, S, S]
            elif self.input_norm == "od_aligned":
                od = align_nucleus_hue(od)
            mu = od.mean(dim=(1, 2, 3), keepdim=True)
            sd = (od - mu).pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-4).sqrt()
            return (od - mu) / sd
        if self.input_norm == "od_instance":
            x = -torch.log(x.clamp(min=1.0 / 255.0))  # optical density, 0 (white) .. 5.5 (black)
        mu = x.mean(dim=(2, 3), keepdim=True)
        sd = (x - mu).pow(2).mean(dim=(2, 3), keepdim=True).add(1e-4).sqrt()
        return (x - mu) / sd


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
    - "rgb_instance": the same standardisation on the pixel values themselves;
    - "od_background" (the crosslab preset): optical density with each channel's background set to zero (a
      colour cast removed, as od_instance) and one scale for all channels, so the stain's hue is kept;
    - "od_gray": od_background summed over the channels (total stain density, hue dropped), standardised
      and given to the backbone as 3 equal channels: another lab's red-violet nucleus and PBC's blue-violet
      one become the same dark shape (measured worse: the other lab's neutrophils became eosinophils);
    - "od_aligned": od_background after one rotation of the colour (optical-density) space per image that
      turns the colour of its densest pixels (the nucleus) onto a fixed haematoxylin-like direction: the
      nuclear dye's hue is set the same for every lab, while the cytoplasm's hue relative to it (an
      eosinophil's orange granules) is kept. A one-stain Macenko normalisation, smooth and in the graph
      (measured worse on the other lab for the same reason; README "Cells from other labs").
    - "od_sharp": od_background after `sharpen_soft`: a picture softer than SHARPEN_TARGET is unsharp-masked
      until it is about that sharp, a sharp one is left alone. Another lab's camera crops are softer than any
      PBC white cell, and PBC's softest classes (erythroblast, platelet) drew them; in the graph, so training
      applies it after augmentation (a blurred training picture is sharpened like a soft photo) and no
      exported format or app needs a new step.

    `tta` "dihedral8" (eval mode only, so training never sees it) runs the backbone on the 8 rotations and mirrors of
    each image and returns the mean of their logits: still [B, num_classes] logits, so every exported format, the
    uncertainty rule and the app use it unchanged, at 8x the compute.

    `distance` (train.distance.FeatureDistance, attached by export, eval only): forward then returns
    [B, num_classes + 1], the logits and the features' distance to the training classes as the last column.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 input_norm: str = "imagenet", tta: str = "none"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
        self.tta = check_tta(tta)
        self.backbone = backbone
        self.input_norm = input_norm
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        # its own (parameter-free) module so that int8 exports can find it and keep it in fp32 (export.exporters)
        self.norm = InputNorm(input_norm)
        self.distance: nn.Module | None = None  # train.distance.FeatureDistance, attached by export (not trained)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] float32 in 0..1 -> [B, 3, S, S] float32, what the backbone sees."""
        return self.norm(x, self.mean, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.distance is not None and not self.training:
            # [B, C + 1]: the logits, then the feature distance (train.distance; set by export, eval only)
            f = self.features(x)
            return torch.cat([self.backbone.get_classifier()(f), self.distance(f)], dim=1)
        x = self.normalise(x)  # every input_norm is invariant to rotating or mirroring the image: normalise once
        if self.tta == "none" or self.training:
            return self.backbone(x)
        b = x.shape[0]
        return self.backbone(dihedral_views(x)).reshape(8, b, -1).mean(0)  # [8B, C] -> [B, C]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] float32 in 0..1 -> [B, D] pooled features before the classifier layer, averaged over the
        test-time views as forward averages the logits; the classifier layer is linear, so
        backbone.get_classifier()(features(x)) equals forward(x) up to rounding."""
        x = self.normalise(x)
        if self.tta == "none" or self.training:
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        b = x.shape[0]
        f = self.backbone.forward_head(self.backbone.forward_features(dihedral_views(x)), pre_logits=True)
        return f.reshape(8, b, -1).mean(0)  # [8B, D] -> [B, D]


def dihedral_views(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [8B, 3, S, S]: the dihedral group of the square (identity, 3 mirrors/rot180, transpose,
    2 rotations, anti-transpose), view-major, so reshape(8, B, ...) undoes it."""
    t = x.transpose(2, 3)
    return torch.cat([x, x.flip(3), x.flip(2), x.flip((2, 3)), t, t.flip(3), t.flip(2), t.flip((2, 3))])


# Ruifrok & Johnston's haematoxylin direction in optical density (R, G, B), unit length: where od_aligned puts
# every image's nuclear colour. Any fixed direction inside the positive octant would do: training sees it too.
NUCLEUS_OD = (0.6443, 0.7167, 0.2668)


def align_nucleus_hue(od: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] background-free optical density -> same, rotated so its nucleus colour is NUCLEUS_OD.

    The nucleus colour is the density-weighted mean colour with weights density^4 (the darkest pixels
    dominate without a threshold or a quantile, which keeps the graph smooth and exportable). The rotation is
    Rodrigues' formula taking that unit vector a onto b: R = I + [v]x + [v]x^2 / (1 + a.b), v = a x b; both lie
    in the positive octant, so a.b > 0 and R is well defined. A blank picture has a ~ 0 and R ~ I.
    """
    dens = od.clamp(min=0).sum(dim=1, keepdim=True)                              # [B, 1, S, S]
    w = dens.pow(4)
    a = (od * w).sum(dim=(2, 3)) / (w.sum(dim=(2, 3)) + 1e-6)                     # [B, 3]
    a = a / (a.norm(dim=1, keepdim=True) + 1e-6)
    b = torch.tensor(NUCLEUS_OD, dtype=od.dtype, device=od.device).expand_as(a)    # [B, 3]
    v = torch.stack([a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1], a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                     a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]], 1)                    # a x b, [B, 3]
    c = (a * b).sum(dim=1)
    zero = torch.zeros_like(c)
    vx = torch.stack([torch.stack([zero, -v[:, 2], v[:, 1]], 1),
                      torch.stack([v[:, 2], zero, -v[:, 0]], 1),
                      torch.stack([-v[:, 1], v[:, 0], zero], 1)], 1)               # [B, 3, 3]
    eye = torch.eye(3, dtype=od.dtype, device=od.device).expand_as(vx)
    rot = eye + vx + vx @ vx / (1 + c).clamp(min=1e-3).view(-1, 1, 1)
    return torch.einsum("bij,bjhw->bihw", rot, od)


# od_sharp: the sharpness (cellcore.quality's measure, on the model input) every picture is lifted to. 0.2 is about
# the 5th percentile of PBC's granulocytes, monocytes and basophils at 64 px (0.21-0.24; lymphocytes 0.14,
# erythroblasts 0.11); the other lab's crops have medians of 0.06-0.13 (`python -m benchmarks.noncell --measure
# ../shared/data/pbc_dev ../shared/data/crosslab_dev --by-class --crop-size 64 --min-side 0.45`).
# SHARPEN_SIGMA is the unsharp mask's Gaussian, in input pixels.
SHARPEN_TARGET = 0.2
SHARPEN_SIGMA = 1.5
SHARPEN_MAX = 8.0  # at most x8 the high-pass: a nearly flat picture is not turned into noise


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """[B, C, H, W] -> same, a separable Gaussian (radius round(2 sigma)) with the edge pixels repeated.

    Written as weighted sums of shifted slices with Python-number weights rather than a convolution: no
    kernel tensor for torch.export to lift and no convolution for an int8 quantiser to claim.
    """
    r = int(2 * sigma + 0.5)
    w = [math.exp(-t * t / (2 * sigma * sigma)) for t in range(-r, r + 1)]
    w = [v / sum(w) for v in w]
    h, wd = x.shape[-2:]
    xp = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")     # [B, C, H + 2r, W + 2r]
    rows = sum(w[i] * xp[:, :, :, i:i + wd] for i in range(2 * r + 1))  # [B, C, H + 2r, W]
    return sum(w[i] * rows[:, :, i:i + h, :] for i in range(2 * r + 1))  # [B, C, H, W]


def _lap_abs(lum: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] -> [B] mean |4-neighbour Laplacian| over the interior."""
    c = lum[:, :, 1:-1, 1:-1]
    lap = 4 * c - lum[:, :, :-2, 1:-1] - lum[:, :, 2:, 1:-1] - lum[:, :, 1:-1, :-2] - lum[:, :, 1:-1, 2:]
    return lap.abs().mean(dim=(1, 2, 3))


def _std(lum: torch.Tensor) -> torch.Tensor:
    return (lum - lum.mean(dim=(1, 2, 3), keepdim=True)).pow(2).mean(dim=(1, 2, 3)).sqrt()


def sharpness(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] in 0..1 -> [B] cellcore.quality._sharpness of each picture: mean |Laplacian| of the luminance
    (0..255) over its standard deviation + 1."""
    lum = x.mean(dim=1, keepdim=True) * 255.0
    return _lap_abs(lum) / (_std(lum) + 1.0)


def sharpen_soft(x: torch.Tensor, target: float = SHARPEN_TARGET, sigma: float = SHARPEN_SIGMA,
                 steps: int = 3) -> torch.Tensor:
    """[B, 3, S, S] float32 in 0..1 -> same, unsharp-masked x + a * (x - blur(x)) with a per-picture amount a >= 0
    that brings the sharpness up to about `target` (a = 0 for a picture already that sharp).

    The sharpness grows about linearly with a, at most by s_h = |Laplacian of the high-pass| / (std + 1) per unit,
    so `steps` updates a += (target - s(a)) / s_h approach the target from below. All plain tensor ops (slices, abs,
    mean, clamp): it exports to every format and commutes with rotations and mirrors (symmetric kernels,
    replicate padding), so the test-time views can share it.
    """
    high = x - gaussian_blur(x, sigma)  # [B, 3, S, S] high-pass
    lum = x.mean(dim=1, keepdim=True) * 255.0
    s0 = _lap_abs(lum) / (_std(lum) + 1.0)                                 # [B]
    sh = _lap_abs(high.mean(dim=1, keepdim=True) * 255.0) / (_std(lum) + 1.0) + 1e-3
    a = torch.zeros_like(s0)
    for _ in range(steps):
        s = sharpness((x + a.view(-1, 1, 1, 1) * high).clamp(0.0, 1.0))
        a = (a + (target - s).clamp(min=0) / sh).clamp(max=SHARPEN_MAX)
    a = torch.where(s0 >= target, torch.zeros_like(a), a)
    return (x + a.view(-1, 1, 1, 1) * high).clamp(0.0, 1.0)


def create_model(arch: str, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
                 input_norm: str = "imagenet", drop_path: float = 0.0) -> Classifier:
    return Classifier(create_backbone(arch, num_classes, drop_path), mean, std, input_norm)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
