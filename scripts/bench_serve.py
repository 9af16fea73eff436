"""Benchmark: this prediction service versus `mlflow models serve`, same model, same input.

    python scripts/bench_serve.py                         # the store's best run, 10 s per load
    python scripts/bench_serve.py --model-uri runs:/<id>/model --seconds 20 --out bench.json

Starts both servers on 127.0.0.1 (`mlflow models serve --env-manager local`), checks they give
the same probabilities for the same 28x28 test image, then drives each with wrk (Debian
package `wrk`) for one client and for eight concurrent clients, posting that image as JSON:
`{"images": [img]}` here, `{"inputs": [img]}` to MLflow's /invocations. Prints latency p50/p99
and requests per second per server, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
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
        print(f"{name:>22} {connections} client(s): {r['requests_per_s']:8.1f} req/s  "
              f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms", flush=True)
    return results


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
    ours_port, mlflow_port = servers.free_port(), servers.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "ours.json").write_text(json.dumps({"images": [image]}))
        (work / "mlflow.json").write_text(json.dumps({"inputs": [image]}))
        ours_url = f"http://127.0.0.1:{ours_port}"
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        env = {"MLFLOW_TRACKING_URI": uri}
        with servers.running(servers.serve_command(model_uri, ours_port, uri, "samples=false"),
                             f"{ours_url}/health", work / "ours.log", env), \
             servers.running(servers.mlflow_serve_command(model_uri, mlflow_port),
                             f"{mlflow_url}/ping", work / "mlflow.log", env):
            ours_probs = [[c["probability"] for c in sorted(p["top"], key=lambda c: c["index"])]
                          for p in post_json(f"{ours_url}/predict?top_k=10",
                                             {"images": [image]})["predictions"]]
            theirs = post_json(f"{mlflow_url}/invocations", {"inputs": [image]})["predictions"]
            gap = float(np.abs(np.array(ours_probs) - np.array(theirs)).max())
            print(f"model {model_uri}: largest probability difference between the two "
                  f"servers {gap:.2e}", flush=True)
            ours = measure("fashion-exp-serve", f"{ours_url}/predict", work / "ours.json",
                           args.seconds, work)
            theirs_r = measure("mlflow models serve", f"{mlflow_url}/invocations",
                               work / "mlflow.json", args.seconds, work)
    print("\n| clients | fashion-exp-serve req/s | p50 ms | p99 ms | mlflow models serve req/s "
          "| p50 ms | p99 ms | throughput ratio | p50 ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for connections, _ in LOADS:
        a, b = ours[f"{connections}"], theirs_r[f"{connections}"]
        print(f"| {connections} | {a['requests_per_s']:.0f} | {a['p50_ms']:.2f} | "
              f"{a['p99_ms']:.2f} | {b['requests_per_s']:.1f} | {b['p50_ms']:.1f} | "
              f"{b['p99_ms']:.1f} | {a['requests_per_s'] / b['requests_per_s']:.1f}x | "
              f"{b['p50_ms'] / a['p50_ms']:.1f}x lower |")
    if args.out:
        args.out.write_text(json.dumps({"model_uri": model_uri, "max_probability_gap": gap,
                                        "fashion_exp_serve": ours,
                                        "mlflow_models_serve": theirs_r}, indent=2))


if __name__ == "__main__":
    main()
