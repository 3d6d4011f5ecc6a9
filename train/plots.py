"""PNG plots of a run: accuracy and loss curves (the paper's Figs. 6-7) and the confusion matrix."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict], out_dir: Path) -> None:
    plt = _plt()
    ep = [r["epoch"] for r in rows]
    for key, title, fname in (("acc", "Accuracy", "accuracy.png"), ("loss", "Cross-entropy loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        ax.plot(ep, [r[f"train_{key}"] for r in rows], label="train (balanced sampler)")
        ax.plot(ep, [r[f"val_{key}"] for r in rows], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(title.lower())
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / fname)
        plt.close(fig)


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str = "Confusion matrix") -> None:
    plt = _plt()
    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 1.0 + 0.6 * n), dpi=110)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
