"""The feature distance: how far a picture's features lie from every training class, carried in the exported graph.

The model's confidence is calibrated on PBC and is confidently wrong on other labs' cells; what those pictures
often still show is features far from every class the model was trained on. Export fits, on the run's training
split, one mean per class and one shared covariance of the pooled features before the classifier layer
(Lee et al. 2018), and appends the smallest Mahalanobis distance to a class mean as one extra output column:
the exported graph returns [B, C + 1] = C logits, then the distance. The uncertainty rule (cellcore.uncertainty)
flags a distance above a threshold fitted per exported file on the validation split; the app needs no
runtime change, since every runtime already returns the whole output row. Measured in the README ("Cells
from other labs"; python -m benchmarks.feature_distance).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("export")

FILE = "feature_distance.npz"  # beside manifest.json: the fitted statistics, for the PyTorch reference


class FeatureDistance(nn.Module):
    """[B, D] pooled features -> [B, 1] smallest squared Mahalanobis distance to a class mean, per dimension.

    Whitened once (z = (f - centre) @ factor, precision = factor @ factor.T), so the graph holds one D x D
    matrix product and C squared differences; centring first keeps the values an int8 model quantises small.
    """

    def __init__(self, centre: np.ndarray, factor: np.ndarray, means: np.ndarray):
        super().__init__()
        self.register_buffer("centre", torch.as_tensor(np.asarray(centre), dtype=torch.float32))   # [D]
        # stored transposed: F.linear(x, W) = x @ W.T, the op every exporter and quantiser knows
        self.register_buffer("proj", torch.as_tensor(np.asarray(factor).T.copy(), dtype=torch.float32))  # [D, D]
        zc = (np.asarray(means, np.float64) - np.asarray(centre, np.float64)) @ np.asarray(factor, np.float64)
        self.register_buffer("class_z", torch.as_tensor(zc, dtype=torch.float32))                  # [C, D]
        self.means = np.asarray(means, np.float64)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.linear(f - self.centre, self.proj)          # [B, D] whitened
        d2 = (z.unsqueeze(1) - self.class_z.unsqueeze(0)).pow(2).mean(-1)    # [B, C]
        return d2.amin(dim=1, keepdim=True)                                  # [B, 1]

    @classmethod
    def fit(cls, feats: np.ndarray, labels: np.ndarray, shrink: float | None = None) -> "FeatureDistance":
        """feats [N, D] of the training split, labels [N] (a class with one image has that image as its mean;
        a fine-tuned run may have one basophil).

        shrink: weight of the isotropic part of the covariance; default D / N (at least 0.01, at most 1): a
        covariance estimated from few images per dimension has tiny, noisy eigenvalues that whitening would
        blow up (as an int8 model's rounding would), so the fewer images, the more it leans on one variance.
        """
        feats, labels = np.asarray(feats, np.float64), np.asarray(labels)
        classes = np.unique(labels)
        if len(feats) <= len(classes):
            raise ValueError(f"fitting the feature distance needs more training images ({len(feats)}) than classes "
                             f"({len(classes)}): the spread around the class means would be empty")
        means = np.stack([feats[labels == c].mean(0) for c in classes])  # [C', D], the classes present
        resid = feats - means[np.searchsorted(classes, labels)]
        cov = resid.T @ resid / len(feats)
        d = cov.shape[0]
        shrink = min(1.0, max(0.01, d / len(feats))) if shrink is None else shrink
        if not 0 <= shrink <= 1:
            raise ValueError(f"shrink {shrink}: must lie in 0..1")
        # shrunk towards its mean variance: invertible, and less noisy than a raw D x D estimate
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / d * np.eye(d)
        factor = np.linalg.cholesky(np.linalg.inv(cov))
        return cls(feats.mean(0), factor, means)

    def save(self, path: Path) -> None:
        np.savez(path, centre=self.centre.numpy(), factor=self.proj.numpy().T, means=self.means)

    @classmethod
    def load(cls, path: Path) -> "FeatureDistance":
        with np.load(path) as z:
            return cls(z["centre"], z["factor"], z["means"])


def fit_on_images(model, images_u8: np.ndarray, labels: np.ndarray, batch: int = 128) -> FeatureDistance:
    """[N, S, S, 3] uint8 training images (preprocessed) -> the fitted distance, from model.features (eval)."""
    feats = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            x = torch.from_numpy(np.ascontiguousarray(images_u8[i:i + batch].transpose(0, 3, 1, 2))).float() / 255
            feats.append(model.features(x).double().numpy())  # [B, D]
    return FeatureDistance.fit(np.concatenate(feats), labels)


def attach_from_export(model, manifest: dict, export_dir: Path) -> bool:
    """Give a checkpoint's model the distance its export carries (manifest uncertainty.feature_distance), so the
    PyTorch reference outputs what the exported files output. False if that export has none."""
    rec = (manifest.get("uncertainty") or {}).get("feature_distance")
    if not rec:
        return False
    path = Path(export_dir) / rec.get("file", FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the feature distance the manifest names is missing; export again")
    model.distance = FeatureDistance.load(path)
    return True
