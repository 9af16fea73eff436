"""Benchmark: the serving image against the same service outside a container, same model.

    python scripts/bench_image.py --image fashion-serve:1 --model-uri models:/fashion@champion
    python scripts/bench_image.py --image fashion-serve:1 --model-uri ... --tracking-uri ...

Needs podman and wrk. Everything runs in a loopback-only network namespace of its own (the
script re-runs itself under `unshare --net`), so the container can use the host network
(`--network host`, no forwarding in between) and still be reached from this machine only.
Printed: the image's size and layers, cold start (from `podman run` to the first 200 on
/ping; best and median of --starts), and /invocations throughput and latency with 1 and 8
clients for fashion-exp-serve outside and the image inside (`--network host`, and
slirp4netns with the port published on 127.0.0.1, as the tests run it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_serve import LOADS, measure, post_json, table

from devtools import servers
from fashion_exp.core import data
from fashion_exp.tracking import store

INSIDE = "FASHION_EXP_BENCH_NETNS"  # set once the script runs in its own network namespace


def podman(*args: str) -> str:
    return subprocess.run(["podman", *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def first_ping(url: str, timeout: float = 120) -> float:
    """Seconds until `url`/ping first answers 200."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no 200 on {url}/ping after {timeout} s")


def run_container(image: str, network: str) -> tuple[str, str, float]:
    """(container id, url, seconds from `podman run` to the first 200 on /ping)."""
    started = time.monotonic()
    if network == "host":
        cid = podman("run", "-d", "--network", "host", image, "serve")
        url = "http://127.0.0.1:8080"
    else:
        port = servers.free_port()
        cid = podman("run", "-d", "--network", "slirp4netns", "-p", f"127.0.0.1:{port}:8080",
                     image, "serve")
        url = f"http://127.0.0.1:{port}"
    first_ping(url)
    return cid, url, time.monotonic() - started


def layers(image: str) -> list[tuple[str, str]]:
    """(size, created by) of each layer, newest first."""
    out = podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image)
    return [tuple(line.split("\t", 1)) for line in out.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--model-uri", required=True, help="the model baked into --image")
    parser.add_argument("--tracking-uri", default=None, help="default: the project's store")
    parser.add_argument("--seconds", type=int, default=10, help="length of each load")
    parser.add_argument("--starts", type=int, default=3, help="cold starts to time")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if not os.environ.get(INSIDE):
        os.execvpe("unshare", ["unshare", "--net", sys.executable, *sys.argv],
                   {**os.environ, INSIDE: "1"})
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    uri = store.resolve_uri(args.tracking_uri) if hasattr(store, "resolve_uri") else (
        args.tracking_uri)
    image = data.read_idx(Path("/usr/share/datasets/fashion-mnist") / data.FILES["x_test"])[0]
    work = Path(tempfile.mkdtemp(prefix="bench-image-"))
    (work / "inputs.json").write_text(json.dumps({"inputs": [image.tolist()]}))
    results: dict[str, object] = {"image": args.image}

    size = int(podman("image", "inspect", args.image, "--format", "{{.Size}}"))
    results["size_mb"] = round(size / 1e6)
    results["layers"] = layers(args.image)
    print(f"{args.image}: {size / 1e6:.0f} MB")
    for layer_size, created in results["layers"]:
        print(f"  {layer_size:>10}  {created[:110]}")

    starts = []
    for _ in range(args.starts):
        cid, _, seconds = run_container(args.image, "host")
        starts.append(seconds)
        podman("rm", "--force", "--time", "0", cid)
    results["cold_start_s"] = {"best": round(min(starts), 2),
                               "median": round(statistics.median(starts), 2)}
    print(f"cold start to the first 200 on /ping: best {min(starts):.2f} s, median "
          f"{statistics.median(starts):.2f} s of {len(starts)}", flush=True)

    rows = {}
    port = servers.free_port()
    outside = f"http://127.0.0.1:{port}"
    command = servers.serve_command(args.model_uri, port, uri or "", "samples=false")
    if uri is None:
        command = [c for c in command if not c.startswith("tracking.uri=")]
    with servers.running(command, f"{outside}/ping", work / "outside.log"):
        expected = post_json(f"{outside}/invocations", {"inputs": [image.tolist()]})
        rows["fashion-exp-serve (outside)"] = measure(
            "fashion-exp-serve (outside)", f"{outside}/invocations", work / "inputs.json",
            args.seconds, work)
    for network in ("host", "slirp4netns"):
        cid, url, _ = run_container(args.image, network)
        try:
            got = post_json(f"{url}/invocations", {"inputs": [image.tolist()]})
            assert got == expected, "the container answers differently"
            name = f"image, --network {network}"
            rows[name] = measure(name, f"{url}/invocations", work / "inputs.json",
                                 args.seconds, work)
        finally:
            podman("rm", "--force", "--time", "0", cid)
    table(rows, "fashion-exp-serve (outside)")
    results["invocations"] = rows
    results["loads"] = [c for c, _ in LOADS]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
