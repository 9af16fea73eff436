"""Benchmark: the service's accuracy on product photos next to its accuracy on the originals.

    python scripts/bench_photos.py                       # all 10,000 test images, best run
    python scripts/bench_photos.py --n 2000 --model-uri runs:/<id>/model --object-size 24

Every test image is rendered as a large RGB product photo (enlarged 6-15x, dark garment in
colour on an off-white background, off-centre in a bigger frame, JPEG quality 70-91) with
`fashion_exp.core.preprocess.render_product_photo`, uploaded to a real fashion-exp-serve on
127.0.0.1, and the answers are compared with the true labels and with the answers for the
original 28x28 arrays sent as JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from devtools import servers
from fashion_exp.core import data
from fashion_exp.core.preprocess import render_product_photo
from fashion_exp.tracking import store, store_checks

BATCH = 16  # images per request: the service's default max_images


def classes(answer: httpx.Response) -> list[int]:
    answer.raise_for_status()
    return [p["top"][0]["index"] for p in answer.json()["predictions"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="default: the best run of the experiment")
    parser.add_argument("--tracking-uri", default=None, help="default: the project's store")
    parser.add_argument("--experiment", default="fashion_exp")
    parser.add_argument("--n", type=int, default=10_000, help="test images to use")
    parser.add_argument("--object-size", type=int, default=28, help="serve's object_size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photo rendering")
    args = parser.parse_args()

    import mlflow

    uri = store_checks.resolve_uri(args.tracking_uri)
    model_uri = args.model_uri or store.best_model_uri(mlflow.MlflowClient(uri),
                                                          args.experiment)
    if model_uri is None:
        sys.exit(f"bench_photos: no run with a model in {uri}: train one first")
    folder = data.locate(None, download=False)
    x = data.read_idx(folder / data.FILES["x_test"])[:args.n]
    y = data.read_idx(folder / data.FILES["y_test"])[:args.n]
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    photos = [render_product_photo(image, rng) for image in x]
    print(f"rendered {len(photos)} photos in {time.perf_counter() - start:.0f} s, mean "
          f"{np.mean([len(p) for p in photos]) / 1000:.1f} kB", flush=True)

    port = servers.free_port()
    base = f"http://127.0.0.1:{port}"
    command = servers.serve_command(model_uri, port, uri, "samples=false",
                                    f"object_size={args.object_size}",
                                    f"max_images={BATCH}")
    with tempfile.TemporaryDirectory() as tmp, \
            servers.running(command, f"{base}/health", Path(tmp) / "serve.log"), \
            httpx.Client(base_url=base, timeout=120) as http:
        on_arrays, on_photos = [], []
        start = time.perf_counter()
        for i in range(0, len(x), BATCH):
            on_arrays += classes(http.post("/predict?top_k=1",
                                           json={"images": x[i:i + BATCH].tolist()}))
        arrays_s = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, len(x), BATCH):
            files = [("files", (f"{j}.jpg", photos[j], "image/jpeg"))
                     for j in range(i, min(i + BATCH, len(x)))]
            on_photos += classes(http.post("/predict?top_k=1", files=files))
        photos_s = time.perf_counter() - start
    arrays_acc = float(np.mean(np.array(on_arrays) == y))
    photos_acc = float(np.mean(np.array(on_photos) == y))
    agree = float(np.mean(np.array(on_arrays) == np.array(on_photos)))
    print(f"\nmodel {model_uri}, {len(x)} test images, object_size={args.object_size}\n"
          "| input | accuracy | images/s through the service |\n|---|---|---|\n"
          f"| original 28x28 arrays (JSON) | {arrays_acc:.4f} | {len(x) / arrays_s:.0f} |\n"
          f"| rendered product photos (JPEG upload) | {photos_acc:.4f} | "
          f"{len(x) / photos_s:.0f} |\n"
          f"same class for photo and original: {agree:.4f}")


if __name__ == "__main__":
    main()
