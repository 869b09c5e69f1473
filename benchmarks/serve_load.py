"""Load test of ``gyre serve``'s server: N concurrent HTTP clients on 127.0.0.1, each one stream
sending one step per request, beside the same model stepped one stream at a time in process.

    .venv/bin/python benchmarks/serve_load.py [--clients 1,16,256,1024] [--seconds 10]
                                              [--hidden 128] [--input 16] [--json FILE]

The server (a 1-layer LSTM, seeded, in its own process with ``torch.set_num_threads(1)``) is the
same :class:`gyre.serve.StreamServer` that ``gyre serve`` runs. Per N it reports stream-steps
per second, request latency p50/p99 and the server's mean batch size. In every round a tenth of
the clients (at least one when N > 1) are killed mid-stream (their connection dropped while a
request is pending); every surviving stream's outputs are then checked against running its
whole sequence offline, and the server must end with no open streams (all closed or evicted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import resource
import socket
import sys
import time
import urllib.request

import torch


def _model(input_size: int, hidden: int):
    from gyre.nn import LSTM
    torch.manual_seed(0)
    return LSTM(input_size, hidden).eval()


def _server(port: int, input_size: int, hidden: int, ready) -> None:
    torch.set_num_threads(1)
    from gyre.serve import Streamer, StreamServer, serve
    s = Streamer(_model(input_size, hidden), max_streams=4096, max_batch=1024, idle_timeout=5.0)
    warm = s.open()  # the first step compiles the streaming kernel (minutes when not cached)
    s.step({warm: torch.zeros(1, input_size)})
    s.close(warm)
    server = StreamServer(s, max_wait=0.002, max_queue=1 << 20, evict_every=0.5)
    ready.set()
    serve(server, "127.0.0.1", port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _round(url: str, n: int, seconds: float, input_size: int, seed: int):
    import aiohttp
    rng = random.Random(seed)
    lat: list[float] = []
    kept: list[tuple[torch.Tensor, list]] = []
    n_kill = 0 if n == 1 else max(1, n // 10)
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(url, connector=conn) as http:
        async def client(i: int):
            sid = (await (await http.post("/streams")).json())["id"]
            xs, ys = [], []
            kill_at = rng.randint(2, 20) if i < n_kill else None
            while time.perf_counter() < stop:
                x = [rng.gauss(0, 1) for _ in range(input_size)]
                t0 = time.perf_counter()
                if kill_at is not None and len(xs) == kill_at:
                    # drop the connection while the request is pending: the server must carry on
                    task = asyncio.ensure_future(http.post(f"/streams/{sid}/steps", json={"x": [x]}))
                    await asyncio.sleep(0.001)
                    task.cancel()
                    return
                async with http.post(f"/streams/{sid}/steps", json={"x": [x]}) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"status {r.status}: {body}")
                lat.append(time.perf_counter() - t0)
                xs.append(x)
                ys.append(body["y"][0])
            await http.delete(f"/streams/{sid}")
            kept.append((torch.tensor(xs), ys))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(n)), return_exceptions=False)
        wall = time.perf_counter() - t0
        metrics = await (await http.get("/metrics")).json()
    return lat, kept, wall, metrics


def _quantile(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def _one_at_a_time(input_size: int, hidden: int, seconds: float) -> float:
    """Stream-steps per second of the same model, one stream stepped at a time (B=1)."""
    from gyre.serve import Streamer
    torch.set_num_threads(1)
    s = Streamer(_model(input_size, hidden))
    sid = s.open()
    x = torch.randn(1, input_size)
    s.step_rows([sid], x)  # warm-up: the first call may compile the streaming kernel
    n, stop = 0, time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        s.step_rows([sid], x)
        n += 1
    return n / (time.perf_counter() - t0)


def _in_process_batched(input_size: int, hidden: int, streams: int, seconds: float) -> float:
    from gyre.serve import Streamer
    torch.set_num_threads(1)
    s = Streamer(_model(input_size, hidden), max_streams=streams, max_batch=streams)
    ids = [s.open() for _ in range(streams)]
    x = torch.randn(streams, input_size)
    s.step_rows(ids, x)  # warm-up
    n, stop = 0, time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        s.step_rows(ids, x)
        n += streams
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,16,256,1024")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--input", type=int, default=16)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counts = [int(c) for c in a.clients.split(",")]
    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_server, args=(port, a.input, a.hidden, ready), daemon=True)
    proc.start()
    rows = []
    try:
        ready.wait(600)
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        model = _model(a.input, a.hidden)
        prev = {"batches": 0, "steps": 0}
        for n in counts:
            lat, kept, wall, m = asyncio.run(_round(url, n, a.seconds, a.input, n))
            worst = 0.0
            for xs, ys in kept:
                if len(ys):
                    with torch.no_grad():
                        want = model(xs[:, None])[0][:, 0]
                    worst = max(worst, float((torch.tensor(ys) - want).abs().max()))
            steps = len(lat)
            batches = m["batches"] - prev["batches"]
            served = m["steps"] - prev["steps"]
            prev = m
            time.sleep(6.0)  # the killed streams are evicted after 5 s idle
            with urllib.request.urlopen(url + "/metrics") as r:
                after = json.loads(r.read())
            row = {"clients": n, "seconds": round(wall, 2), "steps_per_s": round(steps / wall),
                   "p50_ms": round(1000 * _quantile(lat, 0.5), 2),
                   "p99_ms": round(1000 * _quantile(lat, 0.99), 2),
                   "mean_batch": round(served / batches, 1) if batches else None,
                   "killed": 0 if n == 1 else max(1, n // 10),
                   "max_abs_err_vs_offline": worst, "open_streams_after": after["active_streams"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            assert worst < 1e-4, "a surviving stream's outputs differ from running it offline"
            assert after["active_streams"] == 0, "streams leaked"
    finally:
        proc.terminate()
        proc.join(10)
    single = _one_at_a_time(a.input, a.hidden, min(a.seconds, 5))
    batched = _in_process_batched(a.input, a.hidden, 1024, min(a.seconds, 5))
    extra = {"in_process_one_stream_at_a_time_steps_per_s": round(single),
             "in_process_streamer_1024_streams_steps_per_s": round(batched)}
    print(json.dumps(extra))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, **extra, "hidden": a.hidden, "input": a.input}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
