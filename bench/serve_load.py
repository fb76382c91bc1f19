"""Load on `copydet serve`: N concurrent clients on the loopback address, and one request's breakdown.

    python bench/serve_load.py INDEX_DIR --queries QUERY_FOLDER [--clients 1 4 16] [--seconds 30]

Starts ``copydet serve INDEX_DIR`` as its own process on 127.0.0.1 (a free port), waits for
``/healthz``, then:

* single request: ``--single`` sequential requests; the median of each server-side timing
  (decode, views, model, search, verify, total) and of the client's round trip;
* for each N in ``--clients``: N client threads post query images (round robin over the
  folder, raw ``image/jpeg``) for ``--seconds`` seconds (at most 60); requests/s, p50/p95/p99
  latency and errors (a non-200 answer or a failed connection).

The service stops at the end (SIGTERM: Serve shuts down). ``--json`` writes the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(index: str, port: int, sets: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "jobs.cli", "serve", index, "--set", f"serve.port={port}",
           *sum((["--set", s] for s in sets), [])]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"copydet serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if requests.get(f"{url}/healthz", timeout=5).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("copydet serve did not answer /healthz within 300 s")


def single(url: str, bodies: list[bytes], n: int) -> dict:
    parts: dict[str, list[float]] = {}
    with requests.Session() as s:
        for i in range(n):
            t0 = time.perf_counter()
            r = s.post(f"{url}/v1/match", data=bodies[i % len(bodies)], headers={"Content-Type": "image/jpeg"})
            r.raise_for_status()
            parts.setdefault("round_trip", []).append(time.perf_counter() - t0)
            for k, v in r.json()["timings"].items():
                parts.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in parts.items()}


def load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(offset: int) -> None:
        i = offset
        with requests.Session() as s:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    ok = s.post(f"{url}/v1/match", data=bodies[i % len(bodies)],
                                headers={"Content-Type": "image/jpeg"}, timeout=120).status_code == 200
                except requests.RequestException:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt) if ok else None
                    errors[0] += 0 if ok else 1
                i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.zeros(1)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies), "errors": errors[0],
            "rps": round(len(latencies) / wall, 2), "p50": float(np.percentile(lat, 50)),
            "p95": float(np.percentile(lat, 95)), "p99": float(np.percentile(lat, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index", help="index folder (copydet index build)")
    p.add_argument("--queries", required=True, help="folder of query images to send")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=30.0, help="per client count (at most 60)")
    p.add_argument("--single", type=int, default=20, help="sequential requests for the breakdown")
    p.add_argument("--set", action="append", default=[], help="serve.* overrides for the service")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    seconds = min(args.seconds, 60.0)
    bodies = [f.read_bytes() for f in sorted(Path(args.queries).iterdir()) if f.suffix.lower() in (".jpg", ".jpeg")]
    proc, url = start(args.index, free_port(), args.set)
    try:
        health = requests.get(f"{url}/healthz", timeout=10).json()
        print(f"serving {args.index} version {health['version']}: {health['references']} references, "
              f"keys {health['keys']}; {len(bodies)} query images")
        single(url, bodies, 3)  # warm-up: first batches load lazily
        one = single(url, bodies, args.single)
        print("single request, median seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in one.items()))
        rows = []
        print(f"{'clients':>7} {'seconds':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
              f"{'errors':>6}")
        for n in args.clients:
            r = load(url, bodies, n, seconds)
            rows.append(r)
            print(f"{n:7d} {r['seconds']:7.1f} {r['requests']:8d} {r['rps']:7.2f} {r['p50']:7.3f} {r['p95']:7.3f} "
                  f"{r['p99']:7.3f} {r['errors']:6d}")
        if args.json:
            Path(args.json).write_text(json.dumps({"health": health, "single": one, "load": rows}, indent=2))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
