"""Evaluation on the test set and the ``report/`` folder a person looks at.

Metrics come from scikit-learn (confusion matrix, classification report); pictures from
matplotlib (no display needed: the Agg backend).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

CLASS_NAMES = [str(d) for d in range(10)]
REPORT_FILES = (
    "curves.png",
    "confusion_matrix.png",
    "misclassified.png",
    "classification_report.txt",
    "classification_report.json",
)


@dataclass(frozen=True)
class Evaluation:
    """Test-set results of one model."""

    accuracy: float
    loss: float
    probabilities: np.ndarray  # [N, 10]
    predicted: np.ndarray  # [N]
    labels: np.ndarray  # [N]

    @property
    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.labels, self.predicted, labels=range(10))

    def per_class(self) -> dict[str, Any]:
        """scikit-learn's classification report as a dict (precision/recall/F1 per digit)."""
        return classification_report(
            self.labels,
            self.predicted,
            labels=range(10),
            target_names=CLASS_NAMES,
            output_dict=True,
            zero_division=0,
        )


def evaluate(probabilities: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Accuracy and mean cross-entropy of predicted ``probabilities`` against ``labels``."""
    predicted = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(labels)), labels.astype(np.int64)]
    loss = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())
    accuracy = float((predicted == labels).mean())
    return Evaluation(accuracy, loss, probabilities, predicted, labels)


def write_report(
    out_dir: Path, history: dict[str, list[float]], ev: Evaluation, images: np.ndarray, title: str
) -> list[Path]:
    """Write curves, confusion matrix, misclassified grid and classification report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot_curves(out_dir / "curves.png", history, title)
    _plot_confusion(out_dir / "confusion_matrix.png", ev.confusion, title)
    _plot_misclassified(out_dir / "misclassified.png", ev, images, title)
    text = classification_report(
        ev.labels, ev.predicted, labels=range(10), target_names=CLASS_NAMES, digits=4,
        zero_division=0,
    )  # fmt: skip
    (out_dir / "classification_report.txt").write_text(
        f"{title}\ntest accuracy {ev.accuracy:.4f}, test loss {ev.loss:.4f}\n\n{text}"
    )
    (out_dir / "classification_report.json").write_text(json.dumps(ev.per_class(), indent=2))
    return [out_dir / name for name in REPORT_FILES]


def _plot_curves(path: Path, history: dict[str, list[float]], title: str) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                epochs = range(1, len(values) + 1)
                name = "validation" if prefix else "train"
                ax.plot(epochs, values, style, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(path: Path, matrix: np.ndarray, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    # log-ish colour scale so the few off-diagonal errors are visible next to ~1000 hits
    shown = np.log1p(matrix)
    im = ax.imshow(shown, cmap="Blues")
    for i in range(10):
        for j in range(10):
            if matrix[i, j]:
                colour = "white" if shown[i, j] > shown.max() * 0.6 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix — {title}")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_misclassified(path: Path, ev: Evaluation, images: np.ndarray, title: str) -> None:
    wrong = np.flatnonzero(ev.predicted != ev.labels)
    # most confident mistakes first: the ones worth a look
    wrong = wrong[np.argsort(-ev.probabilities[wrong, ev.predicted[wrong]])][:36]
    cols = 6
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, idx in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[idx], cmap="gray", vmin=0, vmax=255)
        p = ev.probabilities[idx, ev.predicted[idx]]
        ax.set_title(f"{ev.labels[idx]} → {ev.predicted[idx]} ({p:.2f})", fontsize=9)
    n_wrong = int((ev.predicted != ev.labels).sum())
    fig.suptitle(f"Misclassified (true → predicted), {n_wrong} of {len(ev.labels)} — {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
