"""Figures of a run: learning curves, confusion matrix, predictions grid, dataset sample.

Figures are built with matplotlib's object API (no pyplot state), so they are safe to make in
any process and are freed when dropped.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from fashion_exp.data import CLASSES

RIGHT, WRONG = "tab:green", "tab:red"


def curves(history: dict[str, list[float]]) -> Figure:
    """Train and validation loss and accuracy per epoch, side by side."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        epochs = np.arange(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], "o-", ms=3, label=f"train {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "s-", ms=3, label=f"validation {metric}")
        ax.set(xlabel="epoch", ylabel=metric, title=metric.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def confusion(matrix: np.ndarray) -> Figure:
    """Confusion matrix of the test set, counts annotated, true classes on rows."""
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(len(CLASSES))
    ax.set_xticks(ticks, CLASSES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title="Test set confusion matrix")
    threshold = matrix.max() / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    return fig


def predictions(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                n: int = 25, n_wrong: int = 10) -> Figure:
    """A grid of test images with predicted class and probability; wrong ones in red.

    The first rows show the first test images, the last row(s) misclassified ones, as the
    original project's results figure did.
    """
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)[:n_wrong]
    chosen = np.concatenate([np.arange(min(n, len(images))), wrong])
    cols = 10
    rows = int(np.ceil(len(chosen) / cols))
    fig = Figure(figsize=(cols * 1.5, rows * 1.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, chosen, strict=False):
        ok = pred[i] == labels[i]
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(f"{CLASSES[pred[i]]} {probs[i, pred[i]]:.0%}\n(true: {CLASSES[labels[i]]})",
                     fontsize=7, color=RIGHT if ok else WRONG)
    fig.suptitle(f"Predictions: first {min(n, len(images))} test images, then "
                 f"{len(wrong)} misclassified (red)")
    return fig


def dataset_sample(images: np.ndarray, labels: np.ndarray, per_class: int = 5) -> Figure:
    """A few training images of every class, one class per column."""
    fig = Figure(figsize=(len(CLASSES) * 1.2, per_class * 1.3), layout="constrained")
    axes = fig.subplots(per_class, len(CLASSES), squeeze=False)
    for c, name in enumerate(CLASSES):
        idx = np.flatnonzero(labels == c)[:per_class]
        for r in range(per_class):
            ax = axes[r, c]
            ax.axis("off")
            if r < len(idx):
                ax.imshow(images[idx[r]], cmap="gray_r")
        axes[0, c].set_title(name, fontsize=8)
    fig.suptitle("Fashion-MNIST training images")
    return fig
