"""The HTTP streaming server (aiohttp): a :class:`Streamer` behind JSON endpoints.

* ``POST /streams`` -> ``{"id": "..."}``
* ``POST /streams/{id}/steps`` with ``{"x": [[f1, f2, ...], ...]}`` -> ``{"y": [...]}``, one
  output per step, in order
* ``DELETE /streams/{id}`` -> ``{"closed": id}``
* ``GET /health`` -> ``{"status": "ok", ...}``; ``GET /metrics`` -> counters, batch sizes and
  latency quantiles (JSON)

Requests only queue their steps; one batcher task runs the queue: it waits until a step is
pending, then up to ``max_wait`` seconds (or until ``max_batch`` streams have a step), takes the
next step of each waiting stream (a stream's steps stay in order) and runs them as one batched
step in a worker thread, so the event loop keeps taking requests meanwhile. The queue holds at
most ``max_queue`` steps: a request that would overflow it gets 503 and nothing is queued.
Errors are JSON ``{"error": "..."}`` with a 4xx status naming the problem.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import time

import torch

from ..extras import need
from .streamer import Streamer, StreamError


class _Request:
    __slots__ = ("sid", "x", "next", "outs", "future", "start")

    def __init__(self, sid, x, future):
        self.sid, self.x, self.next, self.outs, self.future = sid, x, 0, [], future
        self.start = time.perf_counter()


class StreamServer:
    """The aiohttp application around ``streamer``; :meth:`app` builds it, :func:`serve` runs it."""

    def __init__(self, streamer: Streamer, *, max_wait: float = 0.002, max_queue: int = 65536,
                 max_request_steps: int = 4096, evict_every: float = 1.0) -> None:
        if not max_wait >= 0:
            raise ValueError(f"max_wait: got {max_wait!r}, expected seconds >= 0")
        for name, v in (("max_queue", max_queue), ("max_request_steps", max_request_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: got {v!r}, expected an int >= 1")
        self.s = streamer
        self.max_wait = float(max_wait)
        self.max_queue = max_queue
        self.max_request_steps = max_request_steps
        self.evict_every = evict_every
        self.pending: dict[str, collections.deque[_Request]] = {}  # per stream, FIFO
        self.queued = 0
        self.wake: asyncio.Event | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gyre-step")
        self.latency = collections.deque(maxlen=10_000)
        self.counts = collections.Counter()
        self.tasks: list[asyncio.Task] = []

    # -- the batcher ------------------------------------------------------------------------
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            if self.max_wait and len(self.pending) < self.s.max_batch:
                await asyncio.sleep(self.max_wait)
            self.wake.clear()
            while self.pending:
                sids = list(self.pending)[: self.s.max_batch]
                x = torch.stack([self._head_of(sid) for sid in sids])
                try:
                    ys = await loop.run_in_executor(self.pool, self._run, sids, x)
                except StreamError:
                    ys = None  # a stream vanished (evicted/closed) mid-way: answer each alone
                for k, sid in enumerate(sids):
                    q = self.pending.get(sid)
                    if not q:
                        continue
                    req = q[0]
                    if ys is None:
                        try:
                            y = (await loop.run_in_executor(self.pool, self._run, [sid],
                                                            x[k:k + 1]))[0]
                        except StreamError as e:
                            self._fail_stream(sid, e)
                            continue
                    else:
                        y = ys[k]
                    req.outs.append(y)
                    req.next += 1
                    self.queued -= 1
                    if req.next == len(req.x):
                        q.popleft()
                        if not q:
                            del self.pending[sid]
                        if not req.future.done():
                            req.future.set_result(req.outs)
                if self.max_wait and len(self.pending) < self.s.max_batch:
                    await asyncio.sleep(0)  # let new requests join the next batch

    def _head_of(self, sid: str):
        req = self.pending[sid][0]
        return req.x[req.next]

    def _run(self, sids, x) -> list:
        """The batched step, its outputs as Python lists (one conversion for the whole batch)."""
        return self.s.step_rows(sids, x).tolist()

    def _fail_stream(self, sid: str, err: Exception) -> None:
        for req in self.pending.pop(sid, ()):
            self.queued -= len(req.x) - req.next
            if not req.future.done():
                req.future.set_exception(err)

    async def _evictor(self) -> None:
        while True:
            await asyncio.sleep(self.evict_every)
            for sid in self.s.evict_idle():
                if sid in self.pending:
                    self._fail_stream(sid, StreamError(f"stream: {sid!r} was evicted", 404))
                self.counts["evicted"] += 1

    # -- handlers -----------------------------------------------------------------------------
    def _error(self, web, e: StreamError):
        self.counts[f"status_{e.status}"] += 1
        return web.json_response({"error": str(e)}, status=e.status)

    def app(self):
        need("deploy", "aiohttp", feature="gyre serve")
        from aiohttp import web

        async def open_stream(request):
            self.counts["requests"] += 1
            try:
                return web.json_response({"id": self.s.open()})
            except StreamError as e:
                return self._error(web, e)

        async def steps(request):
            self.counts["requests"] += 1
            sid = request.match_info["sid"]
            try:
                try:
                    body = await request.json()
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise StreamError("body: not valid JSON; expected {\"x\": [[f1, ...], ...]}") \
                        from None
                if not isinstance(body, dict) or "x" not in body:
                    raise StreamError("body: expected a JSON object with key \"x\" (a list of "
                                      "steps, each a list of features)")
                x = self.s.check_steps(sid, body["x"])
                if x.shape[0] > self.max_request_steps:
                    raise StreamError(f"x: got {x.shape[0]} steps, at most "
                                      f"{self.max_request_steps} per request", 413)
                if self.queued + x.shape[0] > self.max_queue:
                    raise StreamError(f"queue: full ({self.queued} steps pending, at most "
                                      f"{self.max_queue}); retry later", 503)
            except StreamError as e:
                return self._error(web, e)
            req = _Request(sid, x, asyncio.get_running_loop().create_future())
            self.pending.setdefault(sid, collections.deque()).append(req)
            self.queued += x.shape[0]
            self.wake.set()
            try:
                outs = await req.future
            except StreamError as e:
                return self._error(web, e)
            self.latency.append(time.perf_counter() - req.start)
            self.counts["steps"] += len(outs)
            return web.json_response({"y": outs})

        async def close_stream(request):
            self.counts["requests"] += 1
            sid = request.match_info["sid"]
            try:
                self.s.close(sid)
            except StreamError as e:
                return self._error(web, e)
            self._fail_stream(sid, StreamError(f"stream: {sid!r} was closed", 404))
            return web.json_response({"closed": sid})

        async def health(request):
            return web.json_response({"status": "ok", "active_streams": self.s.active})

        async def metrics(request):
            return web.json_response(self.metrics())

        async def on_startup(app):
            self.wake = asyncio.Event()
            self.tasks = [asyncio.create_task(self._batcher()),
                          asyncio.create_task(self._evictor())]

        async def on_cleanup(app):
            for t in self.tasks:
                t.cancel()
            for t in self.tasks:
                try:
                    await t
                except asyncio.CancelledError:
                    pass
            self.pool.shutdown(wait=True)

        @web.middleware
        async def errors(request, handler):
            try:
                return await handler(request)
            except web.HTTPException as e:
                if e.status >= 400:
                    self.counts[f"status_{e.status}"] += 1
                    return web.json_response({"error": f"{e.reason}: {request.method} "
                                              f"{request.path}"}, status=e.status)
                raise

        app = web.Application(middlewares=[errors], client_max_size=16 * 1024 * 1024)
        app.router.add_post("/streams", open_stream)
        app.router.add_post("/streams/{sid}/steps", steps)
        app.router.add_delete("/streams/{sid}", close_stream)
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app

    def metrics(self) -> dict:
        lat = sorted(self.latency)

        def q(p):
            return None if not lat else round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 3)

        sizes = self.s.batch_sizes
        calls = sum(sizes.values())
        return {
            "requests": self.counts["requests"], "steps": self.counts["steps"],
            "active_streams": self.s.active, "queued_steps": self.queued,
            "evicted": self.counts["evicted"],
            "errors": {k: v for k, v in self.counts.items() if k.startswith("status_")},
            "batches": calls,
            "batch_size": {"mean": round(sum(k * v for k, v in sizes.items()) / calls, 3)
                           if calls else None, "max": max(sizes) if sizes else None},
            "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "n": len(lat)},
        }


def serve(server: StreamServer, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run until interrupted."""
    from aiohttp import web
    web.run_app(server.app(), host=host, port=port, print=None, access_log=None)
