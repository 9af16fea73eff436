"""Benchmark: does the service stay responsive while hostile clients attack it?

    python scripts/bench_attacks.py                      # the store's best run, 8 s per attack
    python scripts/bench_attacks.py --model-uri runs:/<id>/model --seconds 15 --out attacks.json

Starts `fashion-exp-serve` on 127.0.0.1, then runs each attack below for --seconds from
--clients separate processes, while this process asks GET /health every 20 ms over one kept-alive
connection. Prints, per attack, the /health latency (p50, p99, max), how the attackers were
answered, and the server's peak memory (VmHWM) and CPU seconds. All traffic stays on loopback.

Attacks: large JSON bodies (declared and chunked), JSON with too many images, large PNG
uploads that decode to 40 million pixels each, multipart bodies at the size limit, model
references that try to leave the store, oversized headers, and slow clients that never finish
their headers or bodies.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from devtools import servers


def big_png(side: int = 6324) -> bytes:
    """A small RGBA PNG file that decodes to side x side pixels (the issue's 169 kB case)."""
    from PIL import Image

    image = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    image.paste((40, 40, 40, 255), (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return out.getvalue()


def attack_requests(name: str, run_id: str) -> list[dict]:
    """The requests one attacker sends over and over (httpx.request keyword arguments)."""
    json_type = {"Content-Type": "application/json"}
    if name == "json_2mb":
        return [{"content": json.dumps({"images": [0] * 1_000_000}).encode(),
                 "headers": json_type}]
    if name == "json_chunked":
        return [{"content": lambda: (b"0, " * 100_000 for _ in range(20)), "headers": json_type}]
    if name == "json_too_many":
        return [{"json": {"images": [np.zeros((28, 28), int).tolist()] * 200}}]
    if name == "png_40m_pixels":
        return [{"files": [("files", ("big.png", big_png(), "image/png"))]}]
    if name == "multipart_30mb":
        return [{"files": [("files", (f"{i}.png", os.urandom(1_900_000), "image/png"))
                           for i in range(16)]}]
    if name == "model_escape":
        up = "../" * 10
        return [{"params": {"model": f"runs:/{run_id}/{up}etc"}, "json": {"images": []}},
                {"params": {"model": f"runs:/{run_id}/{up}tmp"}, "json": {"images": []}}]
    raise ValueError(name)


def attacker(name: str, base: str, run_id: str, seconds: float, results) -> None:
    """One attacking process: sends its requests (or raw bytes) until the time is up."""
    # Niced: real attackers use their own machines' CPUs, not the two cores the server and
    # the /health prober share here; the server still gets every request they can send.
    os.nice(10)
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds
    if name in ("huge_headers", "slow_headers", "slow_body"):
        host, port = base.removeprefix("http://").split(":")
        while time.monotonic() < deadline:
            statuses[raw_attack(name, host, int(port), deadline)] += 1
        results.put(dict(statuses))
        return
    requests = attack_requests(name, run_id)
    with httpx.Client(base_url=base, timeout=60) as client:
        while time.monotonic() < deadline:
            for args in requests:
                args = dict(args)
                if callable(args.get("content")):
                    args["content"] = args["content"]()
                try:
                    statuses[client.post("/predict", **args).status_code] += 1
                except httpx.HTTPError as err:
                    statuses[type(err).__name__] += 1
    results.put(dict(statuses))


def raw_attack(name: str, host: str, port: int, deadline: float) -> str:
    """One raw-socket attack; what the server did about it."""
    with socket.create_connection((host, port), timeout=max(1.0, deadline - time.monotonic())) \
            as s:
        try:
            if name == "huge_headers":
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8_000_000
                          + b"\r\n\r\n")
            elif name == "slow_headers":
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                while time.monotonic() < deadline:
                    s.sendall(b"X-A: b\r\n")
                    time.sleep(1.0)
            else:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                          b"\r\nContent-Length: 100000\r\n\r\n{")
                while time.monotonic() < deadline:
                    s.sendall(b" ")
                    time.sleep(1.0)
            answer = s.recv(64)
        except (BrokenPipeError, ConnectionResetError):
            return "closed by the server"
        except TimeoutError:
            return "still open when the attack ended"
    return answer.split(b"\r\n")[0].decode(errors="replace") or "closed"


def server_memory_and_cpu(pid: int) -> tuple[float, float]:
    """(peak resident memory in MB, CPU seconds used) of a process so far."""
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines()
                       if line.startswith("VmHWM")))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return peak_kb / 1024, cpu


def health_latencies(base: str, seconds: float) -> list[float]:
    """GET /health every 20 ms for `seconds`; latencies in ms (a timeout counts as 10 s)."""
    latencies = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=base, timeout=10) as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                client.get("/health").raise_for_status()
                latencies.append((time.perf_counter() - start) * 1000)
            except httpx.HTTPError:
                latencies.append(10_000.0)
            time.sleep(0.02)
    return latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


ATTACKS = ("none", "json_2mb", "json_chunked", "json_too_many", "png_40m_pixels",
           "multipart_30mb", "model_escape", "huge_headers", "slow_headers", "slow_body")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", help="model to serve (default: the store's best run)")
    parser.add_argument("--tracking-uri", default=None, help="default: the project's store")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each attack")
    parser.add_argument("--clients", type=int, default=4, help="attacking processes")
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    import mlflow

    from fashion_exp.tracking import store, store_checks

    uri = store_checks.resolve_uri(args.tracking_uri)
    model_uri = args.model_uri or store.best_model_uri(mlflow.MlflowClient(uri),
                                                          "fashion_exp")
    if model_uri is None:
        sys.exit("bench_attacks: no model in the store: train one first or pass --model-uri")
    run_id = model_uri.split("/")[1] if model_uri.startswith("runs:/") else "0" * 32
    port = servers.free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="bench-attacks-")) / "serve.log"
    command = servers.serve_command(model_uri, port, uri, "samples=false", "header_timeout=5",
                                    "body_timeout=5")
    rows = []
    with servers.running(command, f"{base}/health", log) as proc:
        for name in args.attacks:
            results: multiprocessing.Queue = multiprocessing.Queue()
            workers = [] if name == "none" else [
                multiprocessing.Process(target=attacker,
                                        args=(name, base, run_id, args.seconds, results))
                for _ in range(args.clients)]
            for worker in workers:
                worker.start()
            time.sleep(0.5 if workers else 0)  # let the attack get going
            latencies = health_latencies(base, args.seconds - 1)
            answered: Counter = Counter()
            for worker in workers:
                answered.update(results.get(timeout=120))
                worker.join()
            memory, cpu = server_memory_and_cpu(proc.pid)
            row = {"attack": name, "health_p50_ms": percentile(latencies, 50),
                   "health_p99_ms": percentile(latencies, 99),
                   "health_max_ms": max(latencies), "health_requests": len(latencies),
                   "attackers_answered": dict(answered), "server_peak_mb": round(memory),
                   "server_cpu_s": round(cpu, 1)}
            rows.append(row)
            print(f"{name:15s} /health p50 {row['health_p50_ms']:6.1f} ms  p99 "
                  f"{row['health_p99_ms']:7.1f} ms  max {row['health_max_ms']:7.1f} ms  "
                  f"peak {memory:5.0f} MB  answers {dict(answered)}", flush=True)
    text = log.read_text()
    print(f"server log: {len(text.splitlines())} lines, {text.count('Traceback')} tracebacks "
          f"({log})")
    if args.out:
        args.out.write_text(json.dumps({"clients": args.clients, "seconds": args.seconds,
                                        "rows": rows, "median_all": statistics.median(
                                            r["health_p50_ms"] for r in rows)}, indent=2))


if __name__ == "__main__":
    main()
