"""The run's figures as a person sees them in MLflow's artifact preview.

MLflow's run page scales an image to fit a panel about 750 px wide, and `mlflow.log_figure`
saves with savefig's defaults, so sizes are checked in pixels of a 750-px-wide preview.
"""

from __future__ import annotations

import io
import itertools

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from fashion_exp.core import plots
from fashion_exp.core.data import CLASSES

PREVIEW = 750  # px: the width MLflow's run page shows an image at
MIN_PX = 11  # px: the smallest text one reads comfortably there


def saved_dpi(fig: Figure) -> float:
    """The dpi `fig.savefig(path)` uses with no arguments, as `mlflow.log_figure` calls it."""
    dpi = matplotlib.rcParams["savefig.dpi"]
    return fig.dpi if dpi == "figure" else float(dpi)


def preview_px(fig: Figure, fontsize_pt: float) -> float:
    """Height in px of a font of `fontsize_pt` once the saved PNG is shown 750 px wide."""
    dpi = saved_dpi(fig)
    width_px = fig.get_figwidth() * dpi
    return fontsize_pt * dpi / 72 * min(1.0, PREVIEW / width_px)


def png(fig: Figure) -> Image.Image:
    """Save as MLflow does (savefig defaults) and read the PNG back."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def drawn_texts(fig: Figure) -> tuple[list[Text], object]:
    """Draw the figure; return the texts it shows (tick labels only of ticks within the view:
    the locators also place some just outside it, which are not drawn) and the renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    texts = [*fig.texts, *([fig._suptitle] if fig._suptitle else [])]
    for ax in fig.axes:
        texts += [ax.title, *ax.texts]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            texts.append(axis.label)
            texts += [tick.label1 for tick in axis.get_major_ticks()
                      if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9 and tick.label1.get_visible()]
            texts += [tick.label2 for tick in axis.get_major_ticks()
                      if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9 and tick.label2.get_visible()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()], canvas.get_renderer()


def assert_inside(fig: Figure, texts: list[Text], renderer) -> None:
    """Nothing drawn is cut off by the figure's edges."""
    width, height = fig.bbox.width, fig.bbox.height
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0, text.get_text()
        assert box.x1 <= width + 0.5 and box.y1 <= height + 0.5, text.get_text()
    tight = fig.get_tightbbox(renderer)  # in inches; everything drawn
    assert tight.x0 >= -0.01 and tight.y0 >= -0.01
    assert tight.x1 <= fig.get_figwidth() + 0.01 and tight.y1 <= fig.get_figheight() + 0.01


def history(epochs: int) -> dict[str, list[float]]:
    e = np.arange(1, epochs + 1)
    return {"loss": list(1 / e), "val_loss": list(1.2 / e), "accuracy": list(1 - 0.3 / e),
            "val_accuracy": list(0.9 - 0.3 / e), "lr": [1e-3] * epochs}


# --- Learning curves ---------------------------------------------------------------------------

@pytest.mark.parametrize("epochs", [1, 3, 30, 250])
def test_curves_epochs_are_whole_numbers_from_one(epochs):
    fig = plots.curves(history(epochs))
    png(fig)  # ticks are placed as when drawn
    assert len(fig.axes) == 2
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert 0 < lo < 1 and epochs < hi < epochs + 1  # no epoch 0, nothing past the last
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks, "no epoch ticks"
        assert all(float(t).is_integer() for t in ticks), ticks
        assert min(ticks) >= 1 and max(ticks) <= epochs, ticks
        assert len(ticks) >= min(epochs, 3)
        # The first epoch is plotted at x = 1, as MLflow logs it at step 1.
        for line in ax.get_lines():
            xs = line.get_xdata()
            assert xs[0] == 1 and xs[-1] == epochs and len(xs) == epochs


def test_curves_tick_labels_are_integers():
    fig = plots.curves(history(3))
    png(fig)
    texts, _ = drawn_texts(fig)
    ax = fig.axes[0]
    labels = [t.get_text() for t in texts if t in ax.get_xticklabels()]
    assert labels == ["1", "2", "3"]


def test_curves_readable_and_inside():
    fig = plots.curves(history(30))
    texts, renderer = drawn_texts(fig)
    assert_inside(fig, texts, renderer)
    assert min(preview_px(fig, t.get_fontsize()) for t in texts) >= MIN_PX


# --- Predictions grid --------------------------------------------------------------------------

def fake_predictions(count: int = 200, wrong_every: int = 7, seed: int = 0):
    """Random images; every `wrong_every`th one predicted wrong (as the next class) at 61%,
    the others right at 98%."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    pred = labels.astype(int).copy()
    wrong = np.arange(count) % wrong_every == wrong_every - 1
    pred[wrong] = (pred[wrong] + 1) % 10
    probs = np.full((count, 10), 0.0)
    probs[np.arange(count), pred] = np.where(wrong, 0.61, 0.98)
    probs[np.arange(count), (pred + 5) % 10] = 1 - probs[np.arange(count), pred]
    return images, labels, probs, np.flatnonzero(wrong)


def captions(fig: Figure) -> list[Text]:
    """The per-image captions (the coloured texts), in order."""
    return [t for t in fig.axes[0].texts
            if to_rgba(t.get_color()) in (to_rgba(plots.RIGHT), to_rgba(plots.WRONG))]


def test_predictions_content_and_colours():
    images, labels, probs, wrong = fake_predictions()
    fig = plots.predictions(images, labels, probs, n=30, n_wrong=10)
    caps = captions(fig)
    assert len(caps) == 30 + 10
    first, misclassified = caps[:30], caps[30:]
    for i, cap in enumerate(first):
        p, t = probs[i].argmax(), labels[i]
        if p == t:
            assert cap.get_text() == f"{CLASSES[p]} 98%"
            assert to_rgba(cap.get_color()) == to_rgba(plots.RIGHT)
        else:
            assert cap.get_text() == f"{CLASSES[p]} 61%\ntrue: {CLASSES[t]}"
            assert to_rgba(cap.get_color()) == to_rgba(plots.WRONG)
    for i, cap in zip(wrong[:10], misclassified, strict=True):
        assert cap.get_text() == f"{CLASSES[probs[i].argmax()]} 61%\ntrue: {CLASSES[labels[i]]}"
        assert to_rgba(cap.get_color()) == to_rgba(plots.WRONG)
    headings = [t.get_text() for t in fig.axes[0].texts if t not in caps]
    assert headings[0].startswith("First 30 test images")
    assert headings[1] == "10 misclassified test images"


def test_predictions_fast_layout_one_image():
    images, labels, probs, _ = fake_predictions()
    fig = plots.predictions(images, labels, probs)
    assert len(fig.axes) == 1 and len(fig.axes[0].images) == 1  # one mosaic, not 40 axes
    tiled = fig.axes[0].images[0].get_array()
    # Pixels are square: the axes fill the figure, whose shape is the mosaic's.
    assert fig.axes[0].get_position().bounds == pytest.approx((0, 0, 1, 1))
    assert (fig.get_figheight() / fig.get_figwidth()
            == pytest.approx(tiled.shape[0] / tiled.shape[1], rel=1e-3))
    # The wrong ones start on a row of their own (6 per row: 30 first images = 5 rows).
    caps = captions(fig)
    assert caps[30].get_position()[0] == caps[0].get_position()[0]
    assert caps[30].get_position()[1] > caps[29].get_position()[1]


@pytest.mark.parametrize("kwargs", [{}, {"n": 0, "n_wrong": 40}])
def test_predictions_readable_at_mlflow_preview_size(kwargs):
    images, labels, probs, _ = fake_predictions(400)
    fig = plots.predictions(images, labels, probs, **kwargs)
    assert 8 <= fig.get_figwidth() <= 9
    caps = captions(fig)
    assert len(caps) == 40
    for cap in caps:
        assert preview_px(fig, cap.get_fontsize()) >= MIN_PX, cap.get_text()

    texts, renderer = drawn_texts(fig)
    assert_inside(fig, texts, renderer)
    # Neighbouring captions do not run into each other.
    boxes = [cap.get_window_extent(renderer) for cap in caps]
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert not a.overlaps(b), (caps[i].get_text(), caps[j].get_text())

    image = png(fig)
    assert image.size == (round(fig.get_figwidth() * saved_dpi(fig)),
                          round(fig.get_figheight() * saved_dpi(fig)))
    assert image.size[0] <= 900  # shrunk little, if at all, in a ~750 px panel


def test_predictions_longest_captions_fit_their_column():
    # Every caption of the longest class names, right and wrong.
    t_shirt, boot = CLASSES.index("T-shirt/top"), CLASSES.index("Ankle boot")
    labels = np.array([t_shirt, boot] * 6, np.uint8)
    pred = np.array([t_shirt, boot] * 3 + [boot, t_shirt] * 3)
    probs = np.zeros((12, 10))
    probs[np.arange(12), pred] = 1.0
    images = np.full((12, 28, 28), 200, np.uint8)
    fig = plots.predictions(images, labels, probs, n=12, n_wrong=6)
    texts, renderer = drawn_texts(fig)
    assert_inside(fig, texts, renderer)
    caps = captions(fig)
    assert {c.get_text() for c in caps} >= {"T-shirt/top 100%", "Ankle boot 100%",
                                           "Ankle boot 100%\ntrue: T-shirt/top"}
    boxes = [cap.get_window_extent(renderer) for cap in caps]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)


def test_predictions_with_nothing_wrong_or_nothing_asked():
    images, labels, _, _ = fake_predictions(20)
    perfect = np.eye(10)[labels]
    fig = plots.predictions(images, labels, perfect, n=0, n_wrong=40)
    assert [t.get_text() for t in fig.axes[0].texts] == ["No misclassified test images"]
    png(fig)
    fig = plots.predictions(images, labels, perfect, n=0, n_wrong=0)
    assert len(fig.axes[0].texts) == 1
    png(fig)
    fig = plots.predictions(images, labels, perfect, n=30, n_wrong=10)  # fewer than n images
    assert len(captions(fig)) == 20
    png(fig)


# --- Confusion matrix and dataset sample -------------------------------------------------------

def test_confusion_readable_and_inside():
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 30, (10, 10))
    matrix[np.diag_indices(10)] = rng.integers(850, 1000, 10)
    fig = plots.confusion(matrix)
    texts, renderer = drawn_texts(fig)
    assert_inside(fig, texts, renderer)
    assert min(preview_px(fig, t.get_fontsize()) for t in texts) >= MIN_PX
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == list(CLASSES)
    counts = [t for t in fig.axes[0].texts]
    assert len(counts) == 100 and counts[0].get_text() == str(matrix[0, 0])
    # Counts stay inside their cells (a cell is 1 data unit wide).
    ax = fig.axes[0]
    cell = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
    assert max(t.get_window_extent(renderer).width for t in counts) < cell
    png(fig)


def test_dataset_sample_readable_and_inside():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    labels = np.arange(300) % 10
    fig = plots.dataset_sample(images, labels)
    texts, renderer = drawn_texts(fig)
    assert_inside(fig, texts, renderer)
    assert min(preview_px(fig, t.get_fontsize()) for t in texts) >= MIN_PX
    ticks = fig.axes[0].get_xticklabels()
    assert [t.get_text() for t in ticks] == list(CLASSES)
    boxes = [t.get_window_extent(renderer) for t in ticks]
    for a, b in itertools.pairwise(boxes):
        assert a.x1 < b.x0  # class names do not run into each other
    title = fig._suptitle.get_window_extent(renderer)
    assert title.y0 > max(b.y1 for b in boxes)  # the title is above the class names
    # Each class name is centred over its column of images.
    tiled = fig.axes[0].images[0].get_array()
    tile = tiled.shape[1] / 10
    centres = [np.flatnonzero(tiled[:28, round(c * tile):round((c + 1) * tile)].any(axis=0))
               for c in range(10)]
    for c, (tick, cols) in enumerate(zip(fig.axes[0].get_xticks(), centres, strict=True)):
        assert tick == pytest.approx(c * tile + (cols[0] + cols[-1]) / 2, abs=0.5)
    png(fig)
