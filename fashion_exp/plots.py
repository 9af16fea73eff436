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


def _mosaic(images: np.ndarray, cols: int, pad: int = 2, below: int = 0) -> np.ndarray:
    """Tile equally sized images into one array, row by row, with blank borders (and `below`
    blank rows under each image, room for a caption)."""
    n, h, w = images.shape
    rows = int(np.ceil(n / cols))
    th, tw = h + pad + below, w + pad
    tiles = np.zeros((rows * cols, th, tw), images.dtype)
    tiles[:n, :h, :w] = images
    return tiles.reshape(rows, cols, th, tw).swapaxes(1, 2).reshape(rows * th, cols * tw)


def predictions(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                n: int = 30, n_wrong: int = 10) -> Figure:
    """A grid of test images with predicted class and probability; wrong ones in red.

    The first rows show the first test images, the last row misclassified ones, as the
    original project's results figure did. One image tiled from all of them keeps this fast.
    """
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != labels)[:n_wrong]
    chosen = np.concatenate([np.arange(min(n, len(images))), wrong])
    cols, below = 10, 14
    rows = int(np.ceil(len(chosen) / cols))
    fig = Figure(figsize=(cols * 1.45, rows * 2.0 + 0.4))
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / (rows * 2.0 + 0.4)))
    ax.imshow(_mosaic(images[chosen], cols, below=below), cmap="gray_r", aspect="auto")
    for k, i in enumerate(chosen):
        r, c = divmod(k, cols)
        ok = pred[i] == labels[i]
        ax.text(c * 30 + 14, r * (30 + below) + 29,
                f"{CLASSES[pred[i]]} {probs[i, pred[i]]:.0%}\n(true: {CLASSES[labels[i]]})",
                ha="center", va="top", fontsize=6.5, color=RIGHT if ok else WRONG)
    ax.axis("off")
    title = f"Predictions: first {min(n, len(images))} test images, then " if n else ""
    fig.suptitle(f"{title}{len(wrong)} misclassified test images (red)", y=0.99)
    return fig


def dataset_sample(images: np.ndarray, labels: np.ndarray, per_class: int = 6) -> Figure:
    """A few training images of every class, one class per column."""
    grid = np.zeros((per_class, len(CLASSES), 28, 28), np.uint8)
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)[:per_class]
        grid[: len(idx), c] = images[idx]
    fig = Figure(figsize=(len(CLASSES) * 1.1, per_class * 1.1 + 0.6))
    ax = fig.add_axes((0, 0, 1, 0.88))
    ax.imshow(_mosaic(grid.reshape(-1, 28, 28), len(CLASSES)), cmap="gray_r")
    ax.set_xticks(np.arange(len(CLASSES)) * 30 + 14, CLASSES, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle("Fashion-MNIST training images", y=0.99)
    return fig
