"""Batch augmentation for cell images, run on the training device after the loader."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CellAugment:
    """Augmentations that respect what a smear photo can look like.

    A cell has no orientation, so any rotation and either mirror image is as real as the
    original; the CellaVision crop centres the cell, so zoom and shift stay small; stain
    intensity varies between slides and labs, hence brightness/contrast/saturation jitter.
    All of it is one affine grid_sample plus per-image colour factors over the whole batch.
    """

    rotate: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: [B, 3, S, S] float32 in 0..1 -> same shape, augmented, in 0..1."""
        b, dev = x.shape[0], x.device

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(b, generator=generator).to(dev) * (hi - lo) + lo

        theta_angle = u(0, 2 * math.pi) if self.rotate else torch.zeros(b, device=dev)
        zoom = u(*self.scale)
        flip = (torch.rand(b, generator=generator).to(dev) < 0.5).float() * 2 - 1 if self.flip else torch.ones(b, device=dev)
        cos, sin = torch.cos(theta_angle) / zoom, torch.sin(theta_angle) / zoom
        theta = torch.stack([
            torch.stack([cos * flip, -sin, u(-self.translate, self.translate)], 1),
            torch.stack([sin * flip, cos, u(-self.translate, self.translate)], 1),
        ], 1)  # [B, 2, 3]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # reflection: corners uncovered by the rotation get smear background, not black
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return self.colour(x, generator)

    def colour(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-image brightness, contrast and saturation factors; [B, 3, S, S] in 0..1 -> same."""
        b, dev = x.shape[0], x.device

        def u(lo: float, hi: float) -> torch.Tensor:
            return torch.rand(b, generator=generator).to(dev) * (hi - lo) + lo

        if self.brightness:
            x = x * u(1 - self.brightness, 1 + self.brightness).view(b, 1, 1, 1)
        if self.contrast:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * u(1 - self.contrast, 1 + self.contrast).view(b, 1, 1, 1) + mean
        if self.saturation:
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
            x = (x - gray) * u(1 - self.saturation, 1 + self.saturation).view(b, 1, 1, 1) + gray
        return x.clamp_(0, 1)


@dataclass(frozen=True)
class DihedralAugment:
    """The 8 symmetries of the square (4 quarter turns x mirror), optionally with stain jitter.

    Unlike CellAugment's free rotation and zoom, these move pixels without resampling: the
    images are cached at the model's input size, so bilinear resampling there would blur every
    training image while validation and the phone see sharp ones. On 2 CPU cores this choice
    (with the recipe in the `cpu` preset) measured better than CellAugment; see the README.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: [B, 3, S, S] float32 in 0..1 -> same shape, each image in one of its 8 orientations."""
        b = x.shape[0]
        k = torch.randint(0, 4, (b,), generator=generator).to(x.device)
        mirror = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(mirror, x.flip(-1), x)
        out = x.clone()
        for turns in (1, 2, 3):
            sel = k == turns
            if sel.any():
                out[sel] = torch.rot90(x[sel], turns, dims=(-2, -1))
        return CellAugment(rotate=False, flip=False, scale=(1.0, 1.0), translate=0.0, brightness=self.brightness,
                           contrast=self.contrast, saturation=self.saturation).colour(out, generator)


AUGMENTS = {"none": None, "cells": CellAugment(), "dihedral": DihedralAugment()}
