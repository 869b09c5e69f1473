"""Load test of ``gyre serve``'s server: N concurrent streams on 127.0.0.1, each a client sending
k steps per request over HTTP (``POST /streams/{id}/steps``) or WebSocket (``/streams/{id}/ws``),
beside the same model stepped one stream at a time in process.

    .venv/bin/python benchmarks/serve_load.py [--clients 1,16,256,1024] [--seconds 8]
        [--steps 1,8] [--transport http,ws] [--cases ws:1,http:8] [--rate 0]
        [--client-procs 2] [--idle 20] [--hidden 128] [--input 16] [--json FILE]
        [--server-kill] [--streamer-only]

The server (a 1-layer LSTM, seeded, ``torch.set_num_threads(1)``) is the same
:class:`gyre.serve.StreamServer` that ``gyre serve`` runs, in its own process; the clients run in
``--client-procs`` other processes (aiohttp client, uvloop), each holding its share of the
streams, so the load generator's own cost is apart from the server's and measured (CPU seconds
of each side per round). ``--rate 0``: closed loop, each stream sends its next request when the
answer came. ``--rate R``: paced (open loop per stream), each stream offers R steps per second:
request m (k steps) is due at ``start + phase + m k / R`` (random phase), whatever happened
before; a stream whose previous answer came after its next due time sends at once and stays
behind until it catches up, and latency counts from the due time, so a server (or a load
generator) that falls behind shows in p99 and in ``sustained``, not hidden by a slower offer.
A paced row adds the offered rate, the requests due, the late sends (sent more than 1 ms after
their due time), the service latency (from the send) and ``sustained`` (every due request
answered, the offered rate served within 3%, at most 1% late sends).

Per round: stream-steps per second (to the last answer), request latency p50/p99, the server's
mean batch size (streams per batched step call), CPU seconds of the server and of the clients,
the server's CPU microseconds per answered step, and the load average. In every round with N > 1
a tenth of the streams run in one more client process that is killed (SIGKILL) mid-round; a
sample of the surviving streams' outputs is then checked against running their whole sequences
offline, and the server must end the round with no open stream, nothing queued and no socket
(killed streams are evicted after ``--idle`` s). Only answered requests (200) count as steps;
any other answer is listed under ``errors``. ``--server-kill``: at the end, the server gets
SIGTERM under load (256 streams): it must exit within its 5 s shutdown bound, every client must
get an answer or an error (none hangs), and the port must be free again. At the end: the same
model one stream at a time and the in-process :class:`gyre.serve.Streamer` at 1024 streams
(steps per wall second and per CPU second), and a ``verdict`` line reading the issue's targets
off the rows. ``PROFILE=FILE`` in the environment runs the server under cProfile (its stats, in
process CPU time, written to FILE when the server stops).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import socket
import sys
import time
import urllib.request

import numpy as np

SAMPLE = 16  # streams per client process whose steps are kept for the offline check


def _model(input_size: int, hidden: int):
    import torch

    from gyre.nn import LSTM
    torch.manual_seed(0)
    return LSTM(input_size, hidden).eval()


def _orphan_guard() -> None:
    """Exit when the parent (the benchmark) is gone, however it ended."""
    import threading
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _server(port: int, input_size: int, hidden: int, idle: float, ready) -> None:
    _orphan_guard()
    import torch
    torch.set_num_threads(1)
    from gyre.serve import Streamer, StreamServer, serve
    s = Streamer(_model(input_size, hidden), max_streams=4096, max_batch=1024, idle_timeout=idle)
    warm = s.open()  # the first step compiles the streaming kernel (minutes when not cached)
    s.step({warm: torch.zeros(1, input_size)})
    s.close(warm)
    server = StreamServer(s, max_wait=0.002, max_queue=1 << 20, evict_every=0.5)
    if os.environ.get("TRACE"):
        _trace_server(server, os.environ["TRACE"] + ".server.json")
    ready.set()
    if os.environ.get("PROFILE"):
        import cProfile
        prof = cProfile.Profile(time.process_time)  # CPU time: preemption is not the server's
        try:
            prof.runcall(serve, server, "127.0.0.1", port)
        finally:
            prof.dump_stats(os.environ["PROFILE"])
        return
    serve(server, "127.0.0.1", port)


def _trace_gc(out: list) -> None:
    import gc
    t = [0.0]

    def cb(phase, info):
        if phase == "start":
            t[0] = time.perf_counter()
        else:
            out.append((t[0], time.perf_counter() - t[0], info["generation"], info["collected"]))
    gc.callbacks.append(cb)


def _lag_task(out: list):
    async def lag():
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            d = time.perf_counter() - t - 0.001
            if d > 0.002:
                out.append((t, d))
    return asyncio.ensure_future(lag())


def _trace_server(server, path: str) -> None:
    import atexit
    tr = {"gc": [], "lag": [], "run": [], "steps": []}
    _trace_gc(tr["gc"])
    run = server._run

    def traced(sids, xs):
        t = time.perf_counter()
        try:
            return run(sids, xs)
        finally:
            tr["run"].append((t, time.perf_counter() - t, len(sids), sum(x.shape[0] for x in xs)))
    server._run = traced
    steps = server._steps

    async def traced_steps(sid, data):
        t = time.perf_counter()
        r = await steps(sid, data)
        tr["steps"].append((t, time.perf_counter() - t))
        return r
    server._steps = traced_steps
    app = server.app

    def traced_app():
        a = app()

        async def start(_):
            tr["task"] = _lag_task(tr["lag"])
        a.on_startup.append(start)
        return a
    server.app = traced_app

    def dump():
        with open(path, "w") as f:
            json.dump({k: v for k, v in tr.items() if k != "task"}, f)
    atexit.register(dump)


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _clients(url, n, seconds, k, rate, transport, input_size, seed, keep, ready, go):
    """``n`` streams; each opens, tells ``ready``, waits for ``go``, then runs ``seconds``.

    Returns ``(latencies, service latencies, kept (x, y) of the first ``keep`` streams, errors,
    requests due in the window, requests sent late, perf_counter of the last answer)``."""
    import aiohttp
    import orjson
    rng = random.Random(seed)
    # the request bodies, made once: a stream sends them in turn from its own offset (the load
    # generator spends its CPU on sending, not on random numbers and JSON)
    pool = [np.asarray([[rng.gauss(0, 1) for _ in range(input_size)] for _ in range(k)],
                       np.float32) for _ in range(64)]
    bodies = [orjson.dumps({"x": x.tolist()}) for x in pool]
    lat: list[float] = []
    service: list[float] = []
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    errors = collections.Counter()
    loop = asyncio.get_running_loop()
    started = loop.create_future()
    stop = [0.0]
    opened = [0]
    due_total = [0]
    late_total = [0]
    last = [0.0]
    headers = {"Content-Type": "application/json"}
    trace = {"req": [], "gc": [], "lag": []} if os.environ.get("TRACE") else None
    if trace is not None:
        _trace_gc(trace["gc"])
        _lag_task(trace["lag"])

    async def begin():
        await loop.run_in_executor(None, go.wait)
        stop[0] = time.perf_counter() + seconds
        started.set_result(None)

    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one(i: int):
            try:
                async with http.post("/streams") as r:
                    sid = (await r.json())["id"]
                ws = await http.ws_connect(f"/streams/{sid}/ws") if transport == "ws" else None
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
                errors[type(e).__name__] += 1
                sid = ws = None
            opened[0] += 1
            if opened[0] == n:
                ready.put(n)
            await started
            if sid is None:
                return
            xs, ys = [], []
            j = rng.randrange(len(bodies))
            period = k / rate if rate else 0.0
            # paced: request m is due at start + phase + m * period, whatever happened before;
            # a stream whose previous answer came late sends at once and stays behind until it
            # catches up, and its latency counts from the due time (no coordinated omission)
            due = time.perf_counter() + rng.random() * period
            steps_url = f"/streams/{sid}/steps"
            try:
                while True:
                    now = time.perf_counter()
                    if period:
                        if due >= stop[0]:
                            break
                        due_total[0] += 1
                        if due > now:
                            await asyncio.sleep(due - now)
                        elif now - due > 0.001:
                            late_total[0] += 1
                        t_due = due
                        due += period
                    elif now >= stop[0]:
                        break
                    body = bodies[j % len(bodies)]
                    t0 = time.perf_counter()
                    if not period:
                        t_due = t0
                    if ws is None:
                        async with http.post(steps_url, data=body, headers=headers) as r:
                            out = orjson.loads(await r.read())
                            status = r.status
                    else:
                        await ws.send_bytes(body)
                        msg = await ws.receive()
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            raise ConnectionError(f"socket: got {msg.type.name}")
                        out = orjson.loads(msg.data)
                        status = out.get("status", 200)
                    t1 = time.perf_counter()
                    last[0] = max(last[0], t1)
                    if status != 200:
                        errors[status] += 1
                        continue
                    lat.append(t1 - t_due)
                    if trace is not None:
                        trace["req"].append((t_due, t0, t1))
                    service.append(t1 - t0)
                    if i < keep:
                        xs.append(pool[j % len(bodies)])
                        ys += out["y"]
                    j += 1
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
                errors[type(e).__name__] += 1
                return
            if ws is not None:
                await ws.close()
            async with http.delete(f"/streams/{sid}"):
                pass
            if xs:
                kept.append((np.concatenate(xs), np.array(ys, np.float32)))

        await asyncio.gather(begin(), *(one(i) for i in range(n)))
    return lat, service, kept, dict(errors), due_total[0], late_total[0], last[0], trace


def _client_proc(args, out) -> None:
    _orphan_guard()
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    import gc

    import aiohttp  # noqa: F401  (imported before the freeze)
    gc.collect()
    gc.freeze()  # the generator's start-up objects out of its collector's sight, as the server's
    t0 = resource.getrusage(resource.RUSAGE_SELF)
    res = loop.run_until_complete(_clients(*args))
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = t1.ru_utime + t1.ru_stime - t0.ru_utime - t0.ru_stime
    lat, service, kept, errors, due, late, last, trace = res
    out.put({"lat": lat, "service": service, "kept": kept, "errors": errors, "due": due,
             "late": late, "last": last, "cpu": cpu, "trace": trace})


def _quantile(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def _metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics") as r:
        return json.loads(r.read())


def _round(ctx, url, server_pid, n, a, k, rate, transport, model):
    import torch
    procs = min(a.client_procs, n)
    n_kill = 0 if n == 1 else max(1, n // 10)
    n_live = n - n_kill
    q, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [n_live // procs + (i < n_live % procs) for i in range(procs)]
    ps = [ctx.Process(target=_client_proc, args=((url, m, a.seconds, k, rate, transport,
                                                  a.input, 1000 * n + i, SAMPLE, ready, go), q))
          for i, m in enumerate(shares)]
    victim = None
    if n_kill:
        victim = ctx.Process(target=_client_proc, args=((url, n_kill, a.seconds, k, rate,
                                                         transport, a.input, 7, 0, ready, go), q))
        ps.append(victim)
    for p in ps:
        p.start()
    for _ in ps:  # every stream is open (and its socket connected) before the clock starts
        ready.get(timeout=300)
    m0 = _metrics(url)
    load0 = os.getloadavg()[0]
    cpu0 = _cpu(server_pid)
    t_go = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process
    go.set()
    t_kill = None
    if victim is not None:
        time.sleep(a.seconds * random.Random(n).uniform(0.3, 0.6))
        t_kill = time.perf_counter()
        victim.kill()  # a client killed mid-stream: its connections drop, requests pending
    results = [q.get(timeout=a.seconds + 120) for _ in range(len(ps) - (victim is not None))]
    cpu_server = _cpu(server_pid) - cpu0
    m1 = _metrics(url)
    calls = m1["batches"] - m0["batches"]
    stepped = ((m1["batch_size"]["mean"] or 0) * m1["batches"]
               - (m0["batch_size"]["mean"] or 0) * m0["batches"])
    for p in ps:
        p.join(30)
    if os.environ.get("TRACE"):
        with open(f"{os.environ['TRACE']}.{transport}{k}.{n}.clients.json", "w") as f:
            json.dump({"t_go": t_go, "t_kill": t_kill, "procs": [r["trace"] for r in results]}, f)
    lat = [t for r in results for t in r["lat"]]
    service = [t for r in results for t in r["service"]]
    span = max([r["last"] for r in results] + [t_go + 1e-9]) - t_go  # to the last answer
    errors: dict = {}
    for r in results:
        for e, c in r["errors"].items():
            errors[e] = errors.get(e, 0) + c
    worst = 0.0
    for r in results:
        for xs, ys in r["kept"]:
            with torch.no_grad():
                want = model(torch.from_numpy(xs)[:, None])[0][:, 0].numpy()
            worst = max(worst, float(np.abs(ys - want).max()))
    for _ in range(int(a.idle * 2) + 20):  # the killed streams are evicted after idle s
        m = _metrics(url)
        if not m["active_streams"]:
            break
        time.sleep(0.5)
    steps = len(lat) * k
    row = {"transport": transport, "clients": n, "steps_per_request": k,
           "offered_steps_per_s_per_stream": rate or "closed loop",
           "steps_per_s": round(steps / span), "p50_ms": round(1000 * _quantile(lat, 0.5), 2),
           "p99_ms": round(1000 * _quantile(lat, 0.99), 2), "requests": len(lat),
           "mean_batch": round(stepped / calls, 1) if calls else None,
           "killed_streams": n_kill, "errors": errors, "server_cpu_s": round(cpu_server, 2),
           "server_cpu_us_per_step": round(1e6 * cpu_server / max(1, steps), 1),
           "client_cpu_s": round(sum(r["cpu"] for r in results), 2), "seconds": round(span, 2),
           "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "checked_streams": sum(len(r["kept"]) for r in results),
           "max_abs_err_vs_offline": worst,
           "after": {key: m[key] for key in ("active_streams", "queued_steps",
                                             "pending_streams", "sockets")}}
    if rate:
        # the surviving streams' offer: every request due in the window, answered or not;
        # p50/p99 above count from each request's due time, service_* from its send
        due = sum(r["due"] for r in results)
        late = sum(r["late"] for r in results)
        offered = n_live * rate
        row.update({
            "offered_steps_per_s": round(offered), "due_requests": due,
            "late_sends": late, "late_send_fraction": round(late / max(1, due), 4),
            "service_p50_ms": round(1000 * _quantile(service, 0.5), 2),
            "service_p99_ms": round(1000 * _quantile(service, 0.99), 2),
            # sustained: every due request answered (200), the rate kept to within 3%, and at
            # most 1% of the requests sent more than 1 ms after their due time
            "sustained": bool(len(lat) == due and steps / span >= 0.97 * offered
                              and late <= 0.01 * due)})
    return row


def _server_kill(ctx, url, proc, a) -> dict:
    """SIGTERM under load: the server exits within its shutdown bound and frees the port;
    every client ends with an answer or an error."""
    n = 256
    q, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    ps = [ctx.Process(target=_client_proc, args=((url, n // 2, 30.0, 1, 0, "http", a.input,
                                                  i, 0, ready, go), q)) for i in range(2)]
    for p in ps:
        p.start()
    for _ in ps:
        ready.get(timeout=300)
    go.set()
    time.sleep(2.0)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(15)
    exit_s = time.time() - t0
    results = [q.get(timeout=60) for _ in ps]
    for p in ps:
        p.join(10)
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as sock:  # a new server can listen there (raises if not)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    errors: dict = {}
    for r in results:
        for e, c in r["errors"].items():
            errors[e] = errors.get(e, 0) + c
    return {"server_exit_s": round(exit_s, 2), "exitcode": proc.exitcode,
            "answered_before": sum(len(r["lat"]) for r in results), "client_errors": errors,
            "clients_all_returned": all(not p.is_alive() for p in ps), "port_free": True}


def _timed(fn, per_call: int, seconds: float) -> dict:
    """Stream-steps per second of ``fn`` (``per_call`` steps a call), by the wall clock and
    by this process's CPU time (what another process's load distorts least)."""
    fn()  # warm-up: the first call may compile the streaming kernel
    n, stop = 0, time.perf_counter() + seconds
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() < stop:
        fn()
        n += per_call
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"steps_per_s": round(n / wall), "steps_per_cpu_s": round(n / max(cpu, 1e-9)),
            "cpu_share": round(cpu / wall, 3)}


def _one_at_a_time(input_size: int, hidden: int, seconds: float) -> dict:
    """The same model, one stream stepped at a time (B=1)."""
    import torch

    from gyre.serve import Streamer
    s = Streamer(_model(input_size, hidden))
    sid = s.open()
    x = torch.randn(1, input_size)
    return _timed(lambda: s.step_rows([sid], x), 1, seconds)


def _in_process_batched(input_size: int, hidden: int, streams: int, seconds: float) -> dict:
    """:class:`gyre.serve.Streamer` with ``streams`` streams, one step of each per call
    (``step_rows``, as the server calls it) and through ``Streamer.step`` (a dict of
    per-stream rows, checked, as a Python user calls it)."""
    import torch

    from gyre.serve import Streamer
    s = Streamer(_model(input_size, hidden), max_streams=streams, max_batch=streams)
    ids = [s.open() for _ in range(streams)]
    x = torch.randn(streams, input_size)
    rows = dict(zip(ids, x.split(1), strict=True))
    return {"step_rows": _timed(lambda: s.step_rows(ids, x), streams, seconds),
            "step": _timed(lambda: s.step(rows), streams, seconds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,16,256,1024")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--steps", default="1,8", help="steps per request, comma separated")
    p.add_argument("--transport", default="http,ws")
    p.add_argument("--rate", type=float, default=0.0,
                   help="steps per second each stream offers (0: closed loop)")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--input", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--server-kill", action="store_true")
    p.add_argument("--cases", default=None,
                   help="transport:steps pairs, e.g. ws:1,http:8 (default: every --transport "
                        "with every --steps)")
    p.add_argument("--idle", type=float, default=20.0,
                   help="the server's idle timeout (s): longer than opening the streams takes; "
                        "the killed client's streams are evicted after it, each round waits")
    p.add_argument("--streamer-only", action="store_true",
                   help="only the in-process Streamer figures, no server")
    a = p.parse_args(argv)
    cases = ([(c.split(":")[0], int(c.split(":")[1])) for c in a.cases.split(",")] if a.cases
             else [(t, int(k)) for t in a.transport.split(",") for k in a.steps.split(",")])
    import torch
    torch.set_num_threads(1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_server, args=(port, a.input, a.hidden, a.idle, ready),
                       daemon=True)
    if not a.streamer_only:
        proc.start()
    rows, kill = [], None
    try:
        if a.streamer_only:
            cases = []
        else:
            ready.wait(600)
            for _ in range(200):  # until it listens
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
        url = f"http://127.0.0.1:{port}"
        model = _model(a.input, a.hidden)
        for transport, k in cases:
            for n in (int(c) for c in a.clients.split(",")):
                row = _round(ctx, url, proc.pid, n, a, k, a.rate, transport, model)
                rows.append(row)
                print(json.dumps(row), flush=True)
                assert row["max_abs_err_vs_offline"] < 1e-4, \
                    "a surviving stream's outputs differ from running it offline"
                assert not any(row["after"].values()), "streams or requests leaked"
        if a.server_kill and not a.streamer_only:
            kill = _server_kill(ctx, url, proc, a)
            print(json.dumps({"server_kill": kill}), flush=True)
    finally:
        if proc.is_alive():
            proc.terminate()
        if not a.streamer_only:
            proc.join(10)
    single = _one_at_a_time(a.input, a.hidden, min(a.seconds, 5))
    batched = _in_process_batched(a.input, a.hidden, 1024, min(a.seconds, 5))
    extra = {"in_process_one_stream_at_a_time": single,
             "in_process_streamer_1024_streams": batched}
    print(json.dumps(extra))
    verdict = _verdict(rows, batched)
    print(json.dumps({"verdict": verdict}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "server_kill": kill, **extra, "verdict": verdict,
                       "hidden": a.hidden, "input": a.input, "argv": sys.argv[1:]}, f, indent=2)
    return 0


def _verdict(rows: list[dict], streamer: dict) -> dict:
    """The issue's targets read off the rows: a 1024-stream paced row meets the server target
    when its offer (>= 5,000 steps/s) was sustained, it served >= 5,000 steps/s and its p99
    (from each request's due time) is below 50 ms; the Streamer's at >= 100,000 steps/s
    (wall clock, 1024 streams, ``step_rows``)."""
    server = [{"case": f"{r['transport']}:{r['steps_per_request']}",
               "steps_per_s": r["steps_per_s"], "p99_ms": r["p99_ms"],
               "sustained": r["sustained"],
               "met": bool(r["sustained"] and r["offered_steps_per_s"] >= 5000
                           and r["steps_per_s"] >= 5000 and r["p99_ms"] < 50)}
              for r in rows if r["clients"] == 1024 and "sustained" in r]
    sr = streamer["step_rows"]["steps_per_s"]
    return {"server_1024_streams": server or "no paced 1024-stream row",
            "streamer_1024_streams": {"steps_per_s": sr, "met": sr >= 100_000}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
