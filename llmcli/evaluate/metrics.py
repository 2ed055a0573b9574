"""Classification metrics shared by `finetune` (every evaluation) and `eval`.

Plain numpy, so the numbers are easy to audit: per-class precision/recall/F1/support from the
confusion matrix, macro averages over classes, accuracy over examples. A class with no predicted
(or no true) examples gets precision (or recall) 0, as scikit-learn's `zero_division=0`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def safe_exp(x: float) -> float:
    """exp, with inf for a loss too large (perplexity of a diverged or untrained model)."""
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def confusion_matrix(y_true, y_pred, num_labels: int) -> np.ndarray:
    """cm[i, j] = examples of true class i predicted as class j."""
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_report(y_true, y_pred, label_names: list[str]) -> dict[str, Any]:
    cm = confusion_matrix(y_true, y_pred, len(label_names))
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    support = cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": {"labels": list(label_names), "matrix": cm.tolist()},
    }


class TrainerMetrics:
    """compute_metrics for Trainer: the scalar metrics (Trainer prefixes them with eval_). It keeps the
    whole report of the latest evaluation (`last_report`), so the final per-class report and confusion
    matrix come from the final evaluation instead of a second pass over the validation set."""

    def __init__(self, label_names: list[str]):
        self.label_names = label_names
        self.last_report: dict[str, Any] | None = None

    def __call__(self, eval_pred) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        if preds.ndim > 1:
            preds = preds.argmax(-1)
        self.last_report = classification_report(labels, preds, self.label_names)
        return {k: self.last_report[k] for k in ("accuracy", "precision", "recall", "f1")}


def argmax_logits(logits, labels):
    """preprocess_logits_for_metrics: keep predictions, not the whole logits tensor."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)


def save_confusion_matrix(report: dict[str, Any], run_dir: Path) -> list[Path]:
    """confusion_matrix.json always; confusion_matrix.png too when matplotlib is installed."""
    written = [run_dir / "confusion_matrix.json"]
    written[0].write_text(json.dumps(report["confusion_matrix"], indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    labels = report["confusion_matrix"]["labels"]
    cm = np.array(report["confusion_matrix"]["matrix"])
    size = max(3.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(f"accuracy {report['accuracy']:.3f}, macro F1 {report['f1']:.3f}")
    fig.tight_layout()
    fig.savefig(run_dir / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    written.append(run_dir / "confusion_matrix.png")
    return written


def for_trainer(task, label_names: list[str] | None) -> dict[str, Any]:
    """compute_metrics / preprocess_logits for the Trainer (classification); LMs report perplexity from the loss."""
    if task != "classification":
        return {}
    return {"compute_metrics": TrainerMetrics(label_names), "preprocess_logits": argmax_logits}
