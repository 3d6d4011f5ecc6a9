"""Classification metrics from a confusion matrix (numpy only, so the app and benchmarks can share it)."""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[C, C] int64; rows are true classes, columns predictions."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def report(y_true, y_pred, classes: list[str]) -> dict:
    """accuracy, balanced accuracy (mean recall), macro-F1, per-class precision/recall/F1/support, matrix."""
    cm = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0  # classes absent from this data don't drag the macro averages to 0
    n = int(cm.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
    }


def format_report(r: dict) -> str:
    w = max(12, max(len(c) for c in r["classes"]) + 2)
    lines = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for c, m in r["per_class"].items():
        lines.append(f"{c:<{w}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10d}")
    lines.append("")
    lines.append(f"images {r['n']}  accuracy {r['accuracy']:.4f}  balanced accuracy {r['balanced_accuracy']:.4f}  "
                 f"macro-F1 {r['macro_f1']:.4f}")
    lines.append("confusion matrix (rows: true, columns: predicted; order as above)")
    for c, row in zip(r["classes"], r["confusion_matrix"]):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>6d}" for v in row))
    return "\n".join(lines)
