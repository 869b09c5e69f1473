"""The streaming server (aiohttp): a :class:`Streamer` behind JSON endpoints.

* ``POST /streams`` -> ``{"id": "..."}``
* ``POST /streams/{id}/steps`` with ``{"x": [[f1, f2, ...], ...]}`` -> ``{"y": [...]}``, one
  output per step, in order
* ``GET /streams/{id}/ws``: a WebSocket on the same stream; each text message is a body as for
  ``/steps`` and is answered by one message as ``/steps`` answers (``{"y": [...]}``, or
  ``{"error": "...", "status": 4xx}`` with the socket kept open). Messages on one socket are
  answered in order. Closing the socket leaves the stream open (``DELETE`` it, or it is evicted
  when idle), as a dropped HTTP client does.
* ``DELETE /streams/{id}`` -> ``{"closed": id}``
* ``GET /health`` -> ``{"status": "ok", ...}``; ``GET /metrics`` -> counters, batch sizes and
  latency quantiles (JSON)

Requests only queue their steps; one batcher task runs the queue: it waits until a step is
pending, then up to ``max_wait`` seconds more unless ``max_batch`` streams, or every open
stream, already have a step pending (a lone stream is not kept waiting for others), takes up
to ``round_steps`` next steps of each waiting stream's oldest request (a stream's steps stay in
order) and runs them as batched steps (step ``t`` of every stream in one call) on the event
loop's own thread: requests arriving meanwhile wait in the socket buffers. (A worker thread
would let the loop parse them meanwhile, but then the step and the loop take turns on the GIL
at every torch call, each turn up to the interpreter's 5 ms switch interval when both are busy:
measured, 200 ms a round.) The queue holds at most ``max_queue``
steps: a request that would overflow it gets 503 and nothing is queued. Errors are JSON
``{"error": "..."}`` with a 4xx status naming the problem.

Per request the server does little in Python: orjson parses the body and writes the answer
(numpy rows straight to JSON, no Python floats), numpy checks it, the access log is off, and
:func:`serve` runs on uvloop. The stdlib ``json`` and asyncio's loop stand in when those are
not installed (same answers, slower).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import json
import time

import numpy as np
import torch

from ..extras import need
from .streamer import Streamer, StreamError

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is in the deploy extra
    orjson = None


def _loads(data: bytes):
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data)


def _dumps(obj) -> bytes:
    """JSON bytes; numpy arrays are written as nested lists."""
    if orjson is not None:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, default=lambda a: a.tolist()).encode()


_BAD_JSON = (ValueError, UnicodeDecodeError) if orjson is None else \
    (orjson.JSONDecodeError, ValueError, UnicodeDecodeError)


class _Request:
    __slots__ = ("sid", "x", "n", "next", "outs", "future", "start")

    def __init__(self, sid, x: np.ndarray, future):
        self.sid, self.x, self.n, self.next, self.outs, self.future = \
            sid, x, x.shape[0], 0, [], future
        self.start = time.perf_counter()


class StreamServer:
    """The aiohttp application around ``streamer``; :meth:`app` builds it, :func:`serve` runs it.

    ``max_wait``: seconds a batch waits for more streams once a step is pending (0: run at
    once); ``max_queue``: steps pending at most (beyond: 503); ``max_request_steps``: steps in
    one request at most (beyond: 413); ``round_steps``: steps of one stream run per batch round
    (a long request then shares rounds with the others instead of holding one);
    ``evict_every``: seconds between idle-stream sweeps."""

    def __init__(self, streamer: Streamer, *, max_wait: float = 0.002, max_queue: int = 65536,
                 max_request_steps: int = 4096, round_steps: int = 16,
                 evict_every: float = 1.0) -> None:
        if not max_wait >= 0:
            raise ValueError(f"max_wait: got {max_wait!r}, expected seconds >= 0")
        for name, v in (("max_queue", max_queue), ("max_request_steps", max_request_steps),
                        ("round_steps", round_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: got {v!r}, expected an int >= 1")
        self.s = streamer
        self.max_wait = float(max_wait)
        self.max_queue = max_queue
        self.max_request_steps = max_request_steps
        self.round_steps = round_steps
        self.evict_every = evict_every
        self.pending: dict[str, collections.deque[_Request]] = {}  # per stream, FIFO
        self.queued = 0
        self.wake: asyncio.Event | None = None  # a step is pending
        self.full: asyncio.Event | None = None  # no reason to wait for more
        self.latency = collections.deque(maxlen=10_000)
        self.counts = collections.Counter()
        self.round_sizes = collections.Counter()  # streams per batch round
        self.tasks: list[asyncio.Task] = []
        self.sockets: set = set()

    # -- the batcher ------------------------------------------------------------------------
    async def _batcher(self) -> None:
        max_batch = self.s.max_batch
        while True:
            await self.wake.wait()
            if self.max_wait and not self.full.is_set():
                try:
                    await asyncio.wait_for(self.full.wait(), self.max_wait)
                except TimeoutError:
                    pass
            self.wake.clear()
            self.full.clear()
            while self.pending:
                sids = list(itertools.islice(self.pending, max_batch))
                reqs = [self.pending[sid][0] for sid in sids]
                rs = self.round_steps
                xs = [r.x if r.next == 0 and r.n <= rs else r.x[r.next:r.next + rs]
                      for r in reqs]
                try:
                    ys = self._run(sids, xs)
                except StreamError:
                    ys = None  # a stream vanished (evicted/closed) mid-way: run each alone
                self.round_sizes[len(sids)] += 1
                for k, (sid, req) in enumerate(zip(sids, reqs, strict=True)):
                    q = self.pending.get(sid)
                    if not q or q[0] is not req:
                        continue  # closed or evicted meanwhile: its requests were answered
                    if ys is None:
                        try:
                            y = self._run([sid], xs[k:k + 1])[0]
                        except StreamError as e:
                            self._fail_stream(sid, e)
                            continue
                    else:
                        y = ys[k]
                    req.outs.append(y)
                    req.next += len(y)
                    self.queued -= len(y)
                    if req.next == req.n:
                        q.popleft()
                        if not q:
                            del self.pending[sid]
                        if not req.future.done():
                            req.future.set_result(req.outs)
                if self.max_wait and len(self.pending) < max_batch:
                    await asyncio.sleep(0)  # let new requests join the next batch

    def _run(self, sids, xs: list[np.ndarray]) -> list[np.ndarray]:
        """The batched steps of checked rows ``xs``, each stream's outputs as a numpy array
        (written to JSON as is)."""
        if all(x.shape[0] == 1 for x in xs):  # one step each: one call, one conversion
            x = torch.from_numpy(np.concatenate(xs) if len(xs) > 1 else xs[0])
            y = self.s.step_rows(sids, x).numpy()
            return [y[b:b + 1] for b in range(len(sids))]
        return [y.numpy() for y in self.s.run(sids, [torch.from_numpy(x) for x in xs])]

    def _fail_stream(self, sid: str, err: Exception) -> None:
        for req in self.pending.pop(sid, ()):
            self.queued -= req.n - req.next
            if not req.future.done():
                req.future.set_exception(err)

    async def _evictor(self) -> None:
        while True:
            await asyncio.sleep(self.evict_every)
            for _ in self.s.evict_idle(busy=self.pending):  # a stream with steps queued stays
                self.counts["evicted"] += 1

    # -- one request's steps, for both transports ---------------------------------------------
    async def _steps(self, sid: str, data: bytes) -> tuple[int, bytes]:
        """``(status, JSON body)`` for a ``/steps`` body ``data`` of stream ``sid``."""
        self.counts["requests"] += 1
        try:
            try:
                body = _loads(data)
            except _BAD_JSON:
                raise StreamError("body: not valid JSON; expected {\"x\": [[f1, ...], ...]}") \
                    from None
            if not isinstance(body, dict) or "x" not in body:
                raise StreamError("body: expected a JSON object with key \"x\" (a list of "
                                  "steps, each a list of features)")
            x = self.s.check_rows(sid, body["x"])
            if x.shape[0] > self.max_request_steps:
                raise StreamError(f"x: got {x.shape[0]} steps, at most "
                                  f"{self.max_request_steps} per request", 413)
            if self.queued + x.shape[0] > self.max_queue:
                raise StreamError(f"queue: full ({self.queued} steps pending, at most "
                                  f"{self.max_queue}); retry later", 503)
            req = _Request(sid, x, asyncio.get_running_loop().create_future())
            self.pending.setdefault(sid, collections.deque()).append(req)
            self.queued += x.shape[0]
            self.wake.set()
            if len(self.pending) >= min(self.s.max_batch, self.s.active):
                self.full.set()
            outs = await req.future
        except StreamError as e:
            self.counts[f"status_{e.status}"] += 1
            return e.status, _dumps({"error": str(e)})
        self.latency.append(time.perf_counter() - req.start)
        self.counts["steps"] += x.shape[0]
        return 200, _dumps({"y": outs[0] if len(outs) == 1 else np.concatenate(outs)})

    # -- handlers -----------------------------------------------------------------------------
    def app(self):
        need("deploy", "aiohttp", feature="gyre serve")
        from aiohttp import WSMsgType, web

        def reply(status: int, body: bytes):
            return web.Response(body=body, status=status, content_type="application/json")

        def error(e: StreamError):
            self.counts[f"status_{e.status}"] += 1
            return reply(e.status, _dumps({"error": str(e)}))

        async def open_stream(request):
            self.counts["requests"] += 1
            try:
                return reply(200, _dumps({"id": self.s.open()}))
            except StreamError as e:
                return error(e)

        async def steps(request):
            return reply(*await self._steps(request.match_info["sid"], await request.read()))

        async def socket(request):
            sid = request.match_info["sid"]
            try:
                self.s._known(sid)
            except StreamError as e:
                return error(e)
            ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)
            await ws.prepare(request)
            self.sockets.add(ws)
            try:
                async for msg in ws:
                    if msg.type == WSMsgType.TEXT or msg.type == WSMsgType.BINARY:
                        data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                        status, body = await self._steps(sid, data)
                        if status != 200:  # the status inside the message, the socket stays
                            body = body[:-1] + b',"status":' + str(status).encode() + b"}"
                        await ws.send_frame(body, WSMsgType.TEXT)  # orjson's bytes are UTF-8
            except ConnectionResetError:
                self.counts["dropped_sockets"] += 1  # the client went away mid-answer
            finally:
                self.sockets.discard(ws)
            return ws

        async def close_stream(request):
            self.counts["requests"] += 1
            sid = request.match_info["sid"]
            try:
                self.s.close(sid)
            except StreamError as e:
                return error(e)
            self._fail_stream(sid, StreamError(f"stream: {sid!r} was closed", 404))
            return reply(200, _dumps({"closed": sid}))

        async def health(request):
            return reply(200, _dumps({"status": "ok", "active_streams": self.s.active}))

        async def metrics(request):
            return reply(200, _dumps(self.metrics()))

        async def on_startup(app):
            self.wake, self.full = asyncio.Event(), asyncio.Event()
            self.tasks = [asyncio.create_task(self._batcher()),
                          asyncio.create_task(self._evictor())]

        async def on_shutdown(app):
            for ws in list(self.sockets):  # open sockets would hold the shutdown
                await ws.close(code=1001, message=b"server shutting down")

        async def on_cleanup(app):
            for t in self.tasks:
                t.cancel()
            for t in self.tasks:
                try:
                    await t
                except asyncio.CancelledError:
                    pass
            for sid in list(self.pending):
                self._fail_stream(sid, StreamError("server: shutting down", 503))

        @web.middleware
        async def errors(request, handler):
            try:
                return await handler(request)
            except web.HTTPException as e:
                if e.status >= 400:
                    self.counts[f"status_{e.status}"] += 1
                    return reply(e.status, _dumps({"error": f"{e.reason}: {request.method} "
                                                   f"{request.path}"}))
                raise

        app = web.Application(middlewares=[errors], client_max_size=16 * 1024 * 1024)
        app.router.add_post("/streams", open_stream)
        app.router.add_post("/streams/{sid}/steps", steps)
        app.router.add_get("/streams/{sid}/ws", socket)
        app.router.add_delete("/streams/{sid}", close_stream)
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        app.on_startup.append(on_startup)
        app.on_shutdown.append(on_shutdown)
        app.on_cleanup.append(on_cleanup)
        return app

    def metrics(self) -> dict:
        lat = sorted(self.latency)

        def q(p):
            return None if not lat else round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 3)

        sizes = self.s.batch_sizes
        calls = sum(sizes.values())
        rounds = sum(self.round_sizes.values())
        return {
            "requests": self.counts["requests"], "steps": self.counts["steps"],
            "active_streams": self.s.active, "queued_steps": self.queued,
            "pending_streams": len(self.pending), "sockets": len(self.sockets),
            "evicted": self.counts["evicted"],
            "errors": {k: v for k, v in self.counts.items() if k.startswith("status_")},
            "batches": calls,
            "batch_size": {"mean": round(sum(k * v for k, v in sizes.items()) / calls, 3)
                           if calls else None, "max": max(sizes) if sizes else None},
            "rounds": rounds,
            "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "n": len(lat)},
        }


def event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's where installed (the deploy extra), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the deploy extra where it builds
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(server: StreamServer, host: str = "127.0.0.1", port: int = 8080, *,
          shutdown_timeout: float = 5.0) -> None:
    """Run until interrupted (SIGINT/SIGTERM): then stop taking connections, answer what is
    queued (at most ``shutdown_timeout`` seconds), close sockets and the worker thread."""
    from aiohttp import web
    app = server.app()

    async def freeze(app):
        # what exists at start-up (torch, the model, aiohttp: ~170k objects) lives as long as
        # the server: out of the collector's sight, a full collection walks only what requests
        # made (measured under load: one gen-2 pause of 262 ms stalled every stream at 1024)
        gc.collect()
        gc.freeze()
    app.on_startup.append(freeze)
    web.run_app(app, host=host, port=port, print=None, access_log=None,
                shutdown_timeout=shutdown_timeout, loop=event_loop())
