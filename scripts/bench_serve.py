"""Benchmark: this prediction service versus `mlflow models serve`, same model, same input.

    python scripts/bench_serve.py                         # the store's best run, 10 s per load
    python scripts/bench_serve.py --model-uri runs:/<id>/model --seconds 20 --out bench.json

Needs wrk (Debian package `wrk`). Three parts, each printed as a table:

1. MLflow's protocol: both servers on 127.0.0.1 (`mlflow models serve --env-manager local`),
   checked to give the same probabilities for one 28x28 test image, then driven by wrk with
   one client and with eight, posting that image as `{"inputs": [img]}` to each /invocations
   (and as `{"images": [img]}` to this service's own /predict): requests/s, p50, p99, ratios.
2. The cost of /metrics: this service with metrics=true and with metrics=false, same loads.
3. An alias swap under load: the model registered twice in a temporary store, served as
   models:/bench@champion with follow_seconds=0.5; eight clients post to /invocations while
   the alias moves to version 2. Errors (must be 0), p50/p99 over the run, and how soon
   version 2 answered.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from devtools import servers
from fashion_exp.core import data
from fashion_exp.tracking import store, store_checks

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}  # wrk latency units, to milliseconds
LOADS = ((1, 1), (8, 2))  # (connections, wrk threads)


def post_json(url: str, payload: dict) -> dict:
    """POST JSON and return the decoded answer."""
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def wrk(url: str, body_file: Path, connections: int, threads: int, seconds: int,
        workdir: Path) -> dict[str, float]:
    """Requests/s and latency percentiles (ms) of a wrk run posting body_file to url."""
    script = workdir / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*all"); '
                      'f:close()\n')
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                          "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"{url} answered errors under load:\n{out}")
    result = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        result[f"p{pct}_ms"] = float(value) * UNITS[unit]
    return result


def measure(name: str, url: str, body: Path, seconds: int, work: Path) -> dict[str, dict]:
    """Both loads against one server, after a short warm-up."""
    wrk(url, body, 8, 2, 2, work)
    results = {}
    for connections, threads in LOADS:
        results[f"{connections}"] = wrk(url, body, connections, threads, seconds, work)
        r = results[f"{connections}"]
        print(f"{name:>34} {connections} client(s): {r['requests_per_s']:8.1f} req/s  "
              f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms", flush=True)
    return results


def table(rows: dict[str, dict[str, dict]], baseline: str) -> None:
    """One markdown row per (server, load), with ratios to `baseline`."""
    print("\n| server | clients | req/s | p50 ms | p99 ms | throughput vs baseline | "
          "p50 vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for name, results in rows.items():
        for connections, _ in LOADS:
            r, b = results[f"{connections}"], rows[baseline][f"{connections}"]
            print(f"| {name} | {connections} | {r['requests_per_s']:.1f} | {r['p50_ms']:.2f} | "
                  f"{r['p99_ms']:.2f} | {r['requests_per_s'] / b['requests_per_s']:.1f}x | "
                  f"{b['p50_ms'] / r['p50_ms']:.1f}x lower |")
    print(flush=True)


def against_mlflow(model_uri: str, uri: str, image: list, seconds: int,
                   work: Path) -> tuple[dict[str, dict], float]:
    """Part 1: /invocations and /predict of this service, /invocations of MLflow's."""
    ours_port, mlflow_port = servers.free_port(), servers.free_port()
    ours_url, mlflow_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{mlflow_port}"
    env = {"MLFLOW_TRACKING_URI": uri}
    with servers.running(servers.serve_command(model_uri, ours_port, uri, "samples=false"),
                         f"{ours_url}/ping", work / "ours.log", env), \
         servers.running(servers.mlflow_serve_command(model_uri, mlflow_port),
                         f"{mlflow_url}/ping", work / "mlflow.log", env):
        ours = post_json(f"{ours_url}/invocations", {"inputs": [image]})["predictions"]
        theirs = post_json(f"{mlflow_url}/invocations", {"inputs": [image]})["predictions"]
        gap = float(np.abs(np.array(ours) - np.array(theirs)).max())
        print(f"model {model_uri}: largest probability difference between the two servers' "
              f"/invocations {gap:.2e}", flush=True)
        rows = {
            "mlflow models serve /invocations": measure(
                "mlflow models serve /invocations", f"{mlflow_url}/invocations",
                work / "inputs.json", seconds, work),
            "fashion-exp-serve /invocations": measure(
                "fashion-exp-serve /invocations", f"{ours_url}/invocations",
                work / "inputs.json", seconds, work),
            "fashion-exp-serve /predict": measure(
                "fashion-exp-serve /predict", f"{ours_url}/predict", work / "images.json",
                seconds, work),
        }
    table(rows, "mlflow models serve /invocations")
    return rows, gap


def metrics_cost(model_uri: str, uri: str, seconds: int, work: Path) -> dict[str, dict]:
    """Part 2: the same service with and without /metrics and its request counting, both
    started at once and measured in turn, twice (off, on, off, on: drift shows as noise)."""
    rows = {}
    ports = {setting: servers.free_port() for setting in ("metrics=false", "metrics=true")}
    with servers.running(servers.serve_command(model_uri, ports["metrics=false"], uri,
                                               "samples=false", "metrics=false"),
                         f"http://127.0.0.1:{ports['metrics=false']}/ping", work / "off.log"), \
         servers.running(servers.serve_command(model_uri, ports["metrics=true"], uri,
                                               "samples=false", "metrics=true"),
                         f"http://127.0.0.1:{ports['metrics=true']}/ping", work / "on.log"):
        for round_ in (1, 2):
            for setting, port in ports.items():
                rows[f"{setting} (round {round_})"] = measure(
                    f"/invocations {setting}", f"http://127.0.0.1:{port}/invocations",
                    work / "inputs.json", seconds, work)
    table(rows, "metrics=false (round 1)")
    return rows


def swap_under_load(model_uri: str, uri: str, seconds: int, work: Path) -> dict[str, object]:
    """Part 3: eight clients on /invocations while a followed alias moves to a new version."""
    import mlflow

    from fashion_exp.tracking import logged_models

    # Two versions of the model in a store of their own (the user's store is left as it is).
    source = mlflow.MlflowClient(uri)
    model = logged_models.load_keras(logged_models.resolve(source, model_uri))
    swap_uri = f"sqlite:///{work / 'swap.db'}"
    client = mlflow.MlflowClient(swap_uri)
    mlflow.set_tracking_uri(swap_uri)
    experiment = client.create_experiment("bench_swap", artifact_location=(work / "art").as_uri())
    mlflow.set_experiment(experiment_id=experiment)  # where MLflow puts the logged models
    client.create_registered_model("bench")
    for _ in range(2):
        run = client.create_run(experiment)
        logged_models.log_keras(model, swap_uri, run.info.run_id, "bench", 0)
        client.set_terminated(run.info.run_id)
    client.set_registered_model_alias("bench", "champion", "1")
    port = servers.free_port()
    base = f"http://127.0.0.1:{port}"
    with servers.running(servers.serve_command("models:/bench@champion", port, swap_uri,
                                               "samples=false", "follow_seconds=0.5"),
                         f"{base}/ping", work / "swap.log"):
        wrk(f"{base}/invocations", work / "inputs.json", 8, 2, 2, work)  # warm-up
        with ThreadPoolExecutor(1) as pool:
            loaded = pool.submit(wrk, f"{base}/invocations", work / "inputs.json", 8, 2,
                                 seconds, work)
            time.sleep(seconds / 3)
            moved_at = time.perf_counter()
            client.set_registered_model_alias("bench", "champion", "2")
            while answering_version(f"{base}/invocations") != "2":
                time.sleep(0.05)
            swapped_after = time.perf_counter() - moved_at
            result = loaded.result()  # raises if any request failed (non-2xx)
    print(f"alias swap under load (8 clients, {seconds} s): 0 errors, "
          f"{result['requests_per_s']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
          f"p99 {result['p99_ms']:.2f} ms; version 2 answered {swapped_after:.1f} s after "
          "the alias moved", flush=True)
    return {**result, "errors": 0, "swapped_after_s": swapped_after}


def answering_version(url: str) -> str | None:
    """The registered version that answers an /invocations request (its X-Model-Version)."""
    request = urllib.request.Request(url, json.dumps({"inputs": [[[0] * 28] * 28]}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.headers.get("X-Model-Version")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="default: the best run of the experiment")
    parser.add_argument("--tracking-uri", default=None, help="default: the project's store")
    parser.add_argument("--experiment", default="fashion_exp")
    parser.add_argument("--seconds", type=int, default=10, help="length of each load")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench_serve: wrk not found: install it with `apt-get install -y wrk`")

    import mlflow

    uri = store_checks.resolve_uri(args.tracking_uri)
    model_uri = args.model_uri or store.best_model_uri(mlflow.MlflowClient(uri),
                                                          args.experiment)
    if model_uri is None:
        sys.exit(f"bench_serve: no run with a model in {uri}: train one first")
    image = data.read_idx(data.locate(None, download=False) / data.FILES["x_test"])[0].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images.json").write_text(json.dumps({"images": [image]}))
        (work / "inputs.json").write_text(json.dumps({"inputs": [image]}))
        protocol, gap = against_mlflow(model_uri, uri, image, args.seconds, work)
        metrics = metrics_cost(model_uri, uri, args.seconds, work)
        swap = swap_under_load(model_uri, uri, args.seconds, work)
    if args.out:
        args.out.write_text(json.dumps({"model_uri": model_uri, "max_probability_gap": gap,
                                        "protocol": protocol, "metrics": metrics,
                                        "swap": swap}, indent=2))

if __name__ == "__main__":
    main()
