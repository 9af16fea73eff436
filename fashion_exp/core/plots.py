"""Figures of a run: learning curves, confusion matrix, predictions grid, dataset sample.

Figures are built with matplotlib's object API (no pyplot state), so they are safe to make in
any process and are freed when dropped.

They are sized for MLflow's run page, which shows an image artifact scaled to fit a panel
about 750 px wide: MLflow's `log_figure` saves with savefig's defaults (100 dpi), so a figure
about 8-9 in wide is shrunk little and text of 9-10 pt stays at least ~11 px high there.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fashion_exp.core.data import CLASSES

RIGHT, WRONG = "tab:green", "tab:red"


def epoch_ticks() -> MaxNLocator:
    """Whole-number ticks in steps of 1, 2, 5 or 10 (x 10^k); one is enough for one epoch."""
    return MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1)


def curves(history: dict[str, list[float]]) -> Figure:
    """Train and validation loss and accuracy per epoch, side by side.

    Epochs are counted from 1, as the per-epoch metrics are logged (step 1 = first epoch), and
    the epoch axis has whole-number ticks only.
    """
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        epochs = np.arange(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], "o-", ms=3, label=f"train {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "s-", ms=3, label=f"validation {metric}")
        ax.set(xlabel="epoch", ylabel=metric, title=metric.capitalize())
        # Half an epoch of margin: never shows an epoch 0 (or below) however long the run.
        ax.set_xlim(0.5, max(len(epochs), 1) + 0.5)
        ax.xaxis.set_major_locator(epoch_ticks())
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
    ax.set_xticks(ticks, CLASSES, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title="Test set confusion matrix")
    threshold = matrix.max() / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=9,
                color="white" if count > threshold else "black")
    return fig


def _mosaic(images: np.ndarray, cols: int, gap_x: int = 2, gap_y: int = 2) -> np.ndarray:
    """Tile equally sized images into one array, row by row, with blank borders: `gap_x`
    blank columns split evenly left and right of each image, `gap_y` blank rows under it
    (room for a caption). Image k's centre is at x = (k % cols + 0.5) * (w + gap_x) - 0.5."""
    n, h, w = images.shape
    rows = int(np.ceil(n / cols))
    th, tw, left = h + gap_y, w + gap_x, gap_x // 2
    tiles = np.zeros((rows * cols, th, tw), images.dtype)
    tiles[:n, :h, left:left + w] = images
    return tiles.reshape(rows, cols, th, tw).swapaxes(1, 2).reshape(rows * th, cols * tw)


def predictions(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                n: int = 30, n_wrong: int = 10) -> Figure:
    """A grid of test images with predicted class and probability; wrong ones in red, with
    their true class, right ones in green.

    First the first `n` test images, then, from a new row under a heading of their own, up to
    `n_wrong` misclassified ones. One image tiled from all of them keeps this fast.
    """
    cols, width = 6, 8.5  # inches; captions of 10 pt are ~12 px high at MLflow's ~750 px
    gap_x, gap_y, heading = 14, 15, 11  # in image pixels (units of the tiled image)
    pred = probs.argmax(axis=1)
    first = np.arange(min(n, len(images)))
    wrong = np.flatnonzero(pred != labels)[:n_wrong]
    sections = []
    if len(first):
        sections.append((first, f"First {len(first)} test images: predicted class and "
                                "probability (red: wrong, with the true class)"))
    if n_wrong > 0:
        sections.append((wrong, f"{len(wrong)} misclassified test images"
                                if len(wrong) else "No misclassified test images"))
    if not sections:
        sections.append((wrong[:0], "No test images asked for"))

    _, h, w = images.shape
    th, tw = h + gap_y, w + gap_x
    blank = np.zeros((heading, cols * tw), images.dtype)
    parts, texts, top = [], [], 0
    for chosen, title in sections:
        texts.append((cols * tw / 2, top + heading / 2, title, None))
        top += heading
        parts.append(blank)
        if len(chosen):
            parts.append(_mosaic(images[chosen], cols, gap_x, gap_y))
        for k, i in enumerate(chosen):
            r, c = divmod(k, cols)
            caption = f"{CLASSES[pred[i]]} {probs[i, pred[i]]:.0%}"
            if pred[i] != labels[i]:
                caption += f"\ntrue: {CLASSES[labels[i]]}"
            texts.append((c * tw + tw / 2 - 0.5, top + r * th + h + 0.5, caption,
                          RIGHT if pred[i] == labels[i] else WRONG))
        top += int(np.ceil(len(chosen) / cols)) * th
    tiled = np.concatenate(parts)

    fig = Figure(figsize=(width, width * tiled.shape[0] / tiled.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(tiled, cmap="gray_r", interpolation="nearest", aspect="equal")
    for x, y, text, color in texts:
        if color is None:  # a section heading
            ax.text(x, y, text, ha="center", va="center", fontsize=11, fontweight="bold")
        else:
            ax.text(x, y, text, ha="center", va="top", fontsize=10, color=color,
                    linespacing=1.1)
    ax.axis("off")
    return fig


def dataset_sample(images: np.ndarray, labels: np.ndarray, per_class: int = 6) -> Figure:
    """A few training images of every class, one class per column."""
    _, h, w = images.shape
    grid = np.zeros((per_class, len(CLASSES), h, w), images.dtype)
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)[:per_class]
        grid[: len(idx), c] = images[idx]
    tiled = _mosaic(grid.reshape(-1, h, w), len(CLASSES), gap_x=4, gap_y=4)
    width, top = 8.5, 0.7  # inches; `top` holds the title and the class names
    body = width * tiled.shape[0] / tiled.shape[1]
    fig = Figure(figsize=(width, body + top))
    ax = fig.add_axes((0, 0, 1, body / (body + top)))
    ax.imshow(tiled, cmap="gray_r", interpolation="nearest", aspect="equal")
    ax.set_xticks((np.arange(len(CLASSES)) + 0.5) * (w + 4) - 0.5, CLASSES, fontsize=9.5)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.tick_params(length=0, pad=3)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle("Fashion-MNIST training images", y=1 - 0.08 / (body + top), va="top",
                 fontsize=12)
    return fig
