"""IDX reading and checking, finding the files, splitting; one test on the real files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fashion_exp.core import data
from fashion_exp.core.data import FILES, DataError, load_arrays, read_idx

from .helpers import real_data_dir, requires_real_data, write_dataset, write_idx


def test_read_idx_round_trips_images_and_labels(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 9], np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i.gz", images), False), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l.gz", labels), False), labels)


def test_wrong_magic_number_is_named(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.gz", np.zeros((3, 28, 28)), magic=0x0000_0D03)
    with pytest.raises(DataError, match=r"x.gz: wrong IDX magic number 0x00000d03"):
        read_idx(path, False)


def test_body_shorter_than_header_says_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short.gz"
    write_idx(path, np.zeros((3, 28, 28)))
    raw = gzip.decompress(path.read_bytes())[:-100]
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=r"short.gz: .* truncated or corrupt"):
        read_idx(path, False)


def test_cut_gzip_stream_is_named(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "cut.gz", np.ones((50, 28, 28)))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"cut.gz: not a readable gzip file"):
        read_idx(path, False)


def test_not_gzip_at_all_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_text("<html>404</html>")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: not a readable gzip"):
        read_idx(path)


def test_md5_mismatch_refuses_file_with_real_name(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "fake")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: MD5 of the contents is"):
        load_arrays(folder, verify_md5=True)


def test_labels_out_of_range_are_refused(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "d")
    write_idx(folder / FILES["y_test"], np.full(50, 12))
    with pytest.raises(DataError, match="label 12 outside 0..9"):
        load_arrays(folder, verify_md5=False)


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "d")
    write_idx(folder / FILES["y_train"], np.zeros(199))
    with pytest.raises(DataError, match="200 train images but 199 labels"):
        load_arrays(folder, verify_md5=False)


def test_configured_dir_without_files_lists_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.dir=.* lacks train-images-idx3-ubyte.gz.*apt-get"):
        data.locate(str(tmp_path))


def test_nothing_found_lists_every_place_searched(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "KERAS_CACHE", tmp_path / "keras")
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    with pytest.raises(DataError) as info:
        data.locate(None, download=False)
    message = str(info.value)
    assert str(tmp_path / "keras") in message and str(tmp_path / "debian") in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "data.dir" in message


def test_search_order_prefers_configured_then_keras_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "KERAS_CACHE", write_dataset(tmp_path / "keras"))
    monkeypatch.setattr(data, "DEBIAN_DIR", write_dataset(tmp_path / "debian"))
    mine = write_dataset(tmp_path / "mine")
    assert data.locate(str(mine)) == mine
    assert data.locate(None) == tmp_path / "keras"


def test_split_is_seeded_disjoint_and_limited(tmp_path: Path) -> None:
    arrays = load_arrays(write_dataset(tmp_path / "d", n_train=200), verify_md5=False)
    a = data.split(arrays, 0.25, seed=3, limit=None, source=tmp_path)
    b = data.split(arrays, 0.25, seed=3, limit=None, source=tmp_path)
    c = data.split(arrays, 0.25, seed=4, limit=None, source=tmp_path)
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (150, 50, 50)
    assert np.array_equal(a.x_val, b.x_val) and not np.array_equal(a.x_val, c.x_val)
    rows = {img.tobytes() for img in a.x_train} & {img.tobytes() for img in a.x_val}
    assert not rows
    small = data.split(arrays, 0.2, seed=0, limit=40, source=tmp_path)
    assert (len(small.x_train), len(small.x_val), len(small.x_test)) == (32, 8, 40)


@requires_real_data
def test_real_files_are_verified_fashion_mnist() -> None:
    arrays = load_arrays(real_data_dir(), verify_md5=True)
    assert arrays["x_train"].shape == (60_000, 28, 28)
    assert arrays["x_test"].shape == (10_000, 28, 28)
    assert arrays["x_train"].dtype == np.uint8
    assert np.bincount(arrays["y_train"]).tolist() == [6000] * 10
    assert np.bincount(arrays["y_test"]).tolist() == [1000] * 10
    splits = data.load(None, 0.2, seed=0)
    assert (len(splits.x_train), len(splits.x_val)) == (48_000, 12_000)
