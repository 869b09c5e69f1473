"""Streaming: Streamer and the HTTP server batch concurrent streams' steps and give what running
each stream's whole sequence offline gives; bounds, eviction and bad requests answer 4xx/503."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from gyre.nn import GRU, LSTM, Recurrent  # noqa: E402
from gyre.serve import Streamer, StreamError, StreamServer  # noqa: E402
from gyre.tasks import forecast as F  # noqa: E402
from gyre.tasks.classify import RecurrentClassifier  # noqa: E402


def _offline(model, x):
    """Each step's output of the whole sequence ``x`` (T, I), run offline."""
    with torch.no_grad():
        if isinstance(model, Recurrent):
            return model(x[:, None])[0][:, 0]
        return torch.stack([model(x[None, :t + 1])[0][0] for t in range(len(x))])


@pytest.mark.parametrize("model", [
    LSTM(3, 8, 2), GRU(3, 6),
    RecurrentClassifier("lstm", 3, 4, 8, 1, False, head="last", forget_bias=None),
    RecurrentClassifier("gated_004", 3, 4, 8, 1, False, head="mean+max+last"),
    F.Forecaster("lstm", 3, [0, 2], 2, 8, residual="seasonal", season=3),
], ids=["lstm2", "gru", "classify_last", "classify_pooled", "forecast_seasonal"])
def test_streamer_equals_offline_under_any_chunking(model):
    torch.manual_seed(0)
    model.eval()
    s = Streamer(model, max_batch=3)
    ids = [s.open() for _ in range(5)]
    xs = {i: torch.randn(8, 3) for i in ids}
    done = {i: 0 for i in ids}
    got = {i: [] for i in ids}
    rng = random.Random(0)
    while any(done[i] < 8 for i in ids):
        ask = {}
        for i in ids:
            if done[i] < 8 and rng.random() < 0.7:
                k = rng.randint(1, 8 - done[i])
                ask[i] = xs[i][done[i]:done[i] + k]
                done[i] += k
        for i, y in s.step(ask).items():
            got[i].append(y)
    for i in ids:
        torch.testing.assert_close(torch.cat(got[i]), _offline(model, xs[i]), atol=1e-5, rtol=1e-5)
    assert max(s.batch_sizes) <= 3


def test_one_step_each_is_checked_at_once_and_equals_the_stream_by_stream_path():
    torch.manual_seed(3)
    model = RecurrentClassifier("lstm", 3, 4, 8, 1, False, head="last", forget_bias=None).eval()
    fast, slow = Streamer(model, max_batch=2), Streamer(model, max_batch=2)
    ids = [(fast.open(), slow.open()) for _ in range(5)]
    for _ in range(3):
        x = torch.randn(5, 3)
        got = fast.step({f: x[b] if b % 2 else x[b:b + 1] for b, (f, _) in enumerate(ids)})
        want = slow.step({s_: x[b:b + 1].tolist() for b, (_, s_) in enumerate(ids)})
        for f, s_ in ids:
            assert got[f].shape == (1, 4)
            torch.testing.assert_close(got[f], want[s_])
    assert max(fast.batch_sizes) == 2


def test_streamer_refuses_and_bounds():
    with pytest.raises(ValueError, match="bidirectional"):
        Streamer(LSTM(3, 4, bidirectional=True))
    with pytest.raises(ValueError, match="center=True"):
        Streamer(F.Forecaster("lstm", 1, [0], 2, 4, center=True))
    with pytest.raises(ValueError, match="frame=2"):
        Streamer(RecurrentClassifier("lstm", 3, 2, 4, 1, False, frame=2))
    with pytest.raises(ValueError, match="model: got Linear"):
        Streamer(torch.nn.Linear(2, 2))
    s = Streamer(LSTM(3, 4), max_streams=2, idle_timeout=10)
    a, b = s.open(), s.open()
    with pytest.raises(StreamError, match="all 2 stream slots") as e:
        s.open()
    assert e.value.status == 503
    with pytest.raises(StreamError, match="expected 3") as e:
        s.step({a: torch.zeros(2, 4)})
    assert e.value.status == 422
    with pytest.raises(StreamError, match="no open stream with id 'nope'") as e:
        s.step({"nope": torch.zeros(1, 3)})
    assert e.value.status == 404
    s.step({a: torch.zeros(1, 3)})
    with pytest.raises(StreamError, match="not a finite number") as e:  # one step each, batched
        s.step({a: torch.zeros(3), b: torch.tensor([[0, float("nan"), 0]])})
    assert e.value.status == 422
    with pytest.raises(StreamError, match="no open stream with id 'nope'"):
        s.step({a: torch.zeros(3), "nope": torch.zeros(3)})
    import time
    assert s.evict_idle() == []
    assert s.evict_idle(time.monotonic() + 11, busy={a}) == [b]  # a has steps queued
    assert s.evict_idle(time.monotonic() + 11) == [a]
    assert s.active == 0
    s.open()  # slots came back


async def _http(model, body):
    server = StreamServer(Streamer(model, max_streams=64, max_batch=32), max_wait=0.001,
                          max_queue=200)
    client = TestClient(TestServer(server.app(), host="127.0.0.1"))
    await client.start_server()
    try:
        return await body(client, server)
    finally:
        await client.close()


def test_http_streams_equal_offline_and_are_batched():
    torch.manual_seed(1)
    model = LSTM(3, 8).eval()
    xs = [torch.randn(6, 3) for _ in range(12)]

    async def body(client, server):
        async def one(x):
            sid = (await (await client.post("/streams")).json())["id"]
            ys, t = [], 0
            while t < len(x):
                k = random.randint(1, 3)
                r = await client.post(f"/streams/{sid}/steps", json={"x": x[t:t + k].tolist()})
                assert r.status == 200
                ys += (await r.json())["y"]
                t += k
            assert (await client.delete(f"/streams/{sid}")).status == 200
            return torch.tensor(ys)

        outs = await asyncio.wait_for(asyncio.gather(*(one(x) for x in xs)), 60)
        m = await (await client.get("/metrics")).json()
        h = await (await client.get("/health")).json()
        return outs, m, h

    outs, m, h = asyncio.run(_http(model, body))
    for x, y in zip(xs, outs, strict=True):
        torch.testing.assert_close(y, _offline(model, x), atol=1e-5, rtol=1e-5)
    assert h["status"] == "ok" and m["active_streams"] == 0 and m["steps"] == 72
    assert m["batch_size"]["mean"] > 1 and m["latency_ms"]["p99"] is not None


def test_http_bad_requests_get_4xx_and_a_full_queue_503():
    model = LSTM(3, 4).eval()

    async def body(client, server):
        sid = (await (await client.post("/streams")).json())["id"]
        res = {}
        for name, url, kw in [
            ("not_json", f"/streams/{sid}/steps", {"data": b"{x"}),
            ("no_x", f"/streams/{sid}/steps", {"json": {"y": 1}}),
            ("strings", f"/streams/{sid}/steps", {"json": {"x": [["a", "b", "c"]]}}),
            ("ragged", f"/streams/{sid}/steps", {"json": {"x": [[1, 2, 3], [1]]}}),
            ("features", f"/streams/{sid}/steps", {"json": {"x": [[1, 2]]}}),
            ("unknown", "/streams/nope/steps", {"json": {"x": [[1, 2, 3]]}}),
            ("full", f"/streams/{sid}/steps", {"json": {"x": [[0, 0, 0]] * 201}}),
        ]:
            r = await client.post(url, **kw)
            res[name] = (r.status, (await r.json())["error"])
        r = await client.delete("/streams/nope")
        res["delete_unknown"] = (r.status, (await r.json())["error"])
        r = await client.get("/nothing")
        res["route"] = (r.status, (await r.json())["error"])
        # the stream still works after all that
        r = await client.post(f"/streams/{sid}/steps", json={"x": [[1, 2, 3]]})
        res["ok"] = (r.status, await r.json())
        return res

    res = asyncio.run(_http(model, body))
    assert res["not_json"][0] == 400 and "not valid JSON" in res["not_json"][1]
    assert res["no_x"][0] == 400 and '"x"' in res["no_x"][1]
    assert res["strings"][0] == 400 and res["ragged"][0] == 400
    assert res["features"] == (422, "x: got 2 features per step, expected 3")
    assert res["unknown"][0] == 404 and "'nope'" in res["unknown"][1]
    assert res["full"][0] == 503 and "queue" in res["full"][1]
    assert res["delete_unknown"][0] == 404 and res["route"][0] == 404
    assert res["ok"][0] == 200 and len(res["ok"][1]["y"]) == 1


def test_forecaster_stream_refusals_and_quantile_io():
    """Future covariates and the id column are not in a stream's steps: refused by name; a
    one-series quantile run maps each quantile back to the series' units."""
    with pytest.raises(ValueError, match="future_covariates"):
        Streamer(F.Forecaster("lstm", 2, [0], 2, 4, future=[1]))
    with pytest.raises(ValueError, match="id_embedding"):
        Streamer(F.Forecaster("lstm", 2, [0], 2, 4, n_ids=3, id_dim=2))
    m = F.Forecaster("lstm", 2, [1], 2, 4, quantiles=[0.1, 0.5, 0.9]).eval()
    extra = {"scaler": {"kind": "standard", "transform": "log", "loc": [[1.0, 2.0]],
                        "scale": [[2.0, 4.0]]}}
    inp, out = F.stream_io(m, extra)
    torch.testing.assert_close(inp(torch.tensor([[1.0, 1.0]])), torch.tensor([[-0.5, -0.5]]))
    z = torch.tensor([[[[-1.0, 0.0, 1.0]], [[0.0, 0.5, 1.0]]]])  # (1, horizon 2, C_t 1, Q 3)
    torch.testing.assert_close(out(z), (z.double() * 4 + 2).exp().float())
    with pytest.raises(ValueError, match="distribution"):
        F.stream_io(F.Forecaster("lstm", 2, [1], 2, 4, distribution="normal"), extra)


def test_text_models_stream_token_ids():
    """sentiment and lm models: a step is one token id; outputs equal the offline model on each
    prefix (class probabilities; the next token's top-k); a bad id is a 422 naming the range."""
    from gyre.tasks import lm, sentiment
    torch.manual_seed(3)
    clf = sentiment.TextClassifier(40, 3, "lstm", 6, 8, bidirectional=False,
                                   head="max+mean").eval()
    # with an n-gram part the head reads the ids so far, also under a last-step head
    wide = sentiment.TextClassifier(40, 3, "gru", 6, 8, bidirectional=False, head="last",
                                    wide=3, wide_buckets=64).eval()
    torch.nn.init.normal_(wide.wide.weight)
    assert wide.stream_window is None
    lang = lm.LanguageModel(40, "gru", 6, 8).eval()
    ids = torch.randint(1, 40, (7,))
    for model, task in ((clf, sentiment), (wide, sentiment), (lang, lm)):
        _, out = task.stream_io(model, {})
        s = Streamer(model, output=out)
        a, b = s.open(), s.open()
        got = torch.cat([s.step({a: ids[:3, None].tolist(), b: [[1]]})[a],
                         s.step({a: ids[3:, None]})[a]])
        with torch.no_grad():
            want = torch.cat([out(model(ids[None, :t + 1])[0]) for t in range(7)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for bad in ([[40]], [[-1]], [[1.5]]):
            with pytest.raises(StreamError, match="integers from 0 to 39") as e:
                s.step({a: bad})
            assert e.value.status == 422
    assert got.shape == (7, 5, 2)  # lm: [id, probability] of the 5 most probable next tokens


def test_websocket_streams_equal_offline_and_keep_the_socket_on_errors():
    torch.manual_seed(4)
    model = LSTM(3, 8).eval()
    x = torch.randn(7, 3)

    async def body(client, server):
        sid = (await (await client.post("/streams")).json())["id"]
        ws = await client.ws_connect(f"/streams/{sid}/ws")
        ys = []
        for chunk in (x[:1], x[1:4], x[4:]):
            await ws.send_json({"x": chunk.tolist()})
            ys += (await ws.receive_json())["y"]
        await ws.send_str("{x")
        bad_json = await ws.receive_json()
        await ws.send_json({"x": [[1, 2]]})
        bad_size = await ws.receive_json()
        await ws.send_json({"x": x[:1].tolist()})  # the socket still works, the state went on
        after = (await ws.receive_json())["y"]
        await ws.close()
        unknown = await client.get("/streams/nope/ws")
        m = await (await client.get("/metrics")).json()
        return ys, bad_json, bad_size, after, unknown.status, m

    ys, bad_json, bad_size, after, unknown, m = asyncio.run(_http(model, body))
    torch.testing.assert_close(torch.tensor(ys), _offline(model, x), atol=1e-5, rtol=1e-5)
    assert bad_json["status"] == 400 and "not valid JSON" in bad_json["error"]
    assert bad_size == {"error": "x: got 2 features per step, expected 3", "status": 422}
    want = _offline(model, torch.cat([x, x[:1]]))[-1]
    torch.testing.assert_close(torch.tensor(after[0]), want, atol=1e-5, rtol=1e-5)
    assert unknown == 404 and m["sockets"] == 0 and m["active_streams"] == 1


VICTIM = """
import asyncio, sys, aiohttp
async def main(url, http_sid, ws_sid):
    async with aiohttp.ClientSession(url) as s:
        ws = await s.ws_connect(f"/streams/{ws_sid}/ws")
        while True:  # until killed, mid-request
            await ws.send_json({"x": [[0.5, -1.0, 2.0]] * 3})
            t = asyncio.ensure_future(s.post(f"/streams/{http_sid}/steps",
                                             json={"x": [[0.5, -1.0, 2.0]] * 3}))
            await ws.receive()
            print("sent", flush=True)
            await t
asyncio.run(main(*sys.argv[1:]))
"""


def test_a_killed_client_loses_no_other_streams_state_and_leaks_nothing(tmp_path):
    """A client process killed (SIGKILL) mid-request on HTTP and on a WebSocket: the other
    streams go on and equal running offline; the killed streams are evicted when idle and the
    server ends with nothing open, queued or pending."""
    import os
    import sys
    torch.manual_seed(5)
    model = LSTM(3, 8).eval()
    xs = [torch.randn(12, 3) for _ in range(6)]

    async def body(client, server):
        server.s.idle_timeout, server.evict_every = 0.5, 0.1
        victims = [(await (await client.post("/streams")).json())["id"] for _ in range(2)]
        url = f"http://127.0.0.1:{client.port}"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", VICTIM, url, *victims, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": ""})

        async def one(x, use_ws):
            sid = (await (await client.post("/streams")).json())["id"]
            ws = await client.ws_connect(f"/streams/{sid}/ws") if use_ws else None
            ys = []
            for t in range(0, len(x), 2):
                if ws is not None:
                    await ws.send_json({"x": x[t:t + 2].tolist()})
                    ys += (await ws.receive_json())["y"]
                else:
                    r = await client.post(f"/streams/{sid}/steps", json={"x": x[t:t + 2].tolist()})
                    ys += (await r.json())["y"]
                if t == 4:
                    await asyncio.sleep(0.3)  # the kill lands here, mid-stream
            if ws is not None:
                await ws.close()
            await client.delete(f"/streams/{sid}")
            return torch.tensor(ys)

        async def kill():
            for _ in range(3):
                await asyncio.wait_for(proc.stdout.readline(), 60)  # it is streaming
            proc.kill()
            await proc.wait()

        outs = await asyncio.wait_for(asyncio.gather(
            kill(), *(one(x, i % 2 == 1) for i, x in enumerate(xs))), 90)
        for _ in range(50):
            m = await (await client.get("/metrics")).json()
            if m["active_streams"] == 0 and m["sockets"] == 0:
                break
            await asyncio.sleep(0.1)
        return outs[1:], m

    outs, m = asyncio.run(_http(model, body))
    for x, y in zip(xs, outs, strict=True):
        torch.testing.assert_close(y, _offline(model, x), atol=1e-5, rtol=1e-5)
    assert m["evicted"] == 2 and m["active_streams"] == 0 and m["sockets"] == 0
    assert m["queued_steps"] == 0 and m["pending_streams"] == 0


SERVER = """
import sys, torch
from gyre.nn import LSTM
from gyre.serve import Streamer, StreamServer, serve
torch.manual_seed(0)
s = Streamer(LSTM(3, 8).eval(), max_streams=64, max_batch=32)
serve(StreamServer(s, max_wait=0.001), "127.0.0.1", int(sys.argv[1]), shutdown_timeout=2.0)
"""


def test_the_server_killed_under_load_exits_and_frees_its_port():
    """SIGTERM while 24 streams are sending: the server exits (code 0) within its shutdown
    bound, every client ends with answers and then a refused/closed connection (none hangs),
    and the port takes a new listener."""
    import signal
    import socket
    import subprocess
    import sys

    import aiohttp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    url = f"http://127.0.0.1:{port}"

    async def load():
        async with aiohttp.ClientSession(url) as http:
            for _ in range(600):  # until it listens (importing torch takes a while)
                try:
                    await http.get("/health")
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            answered, ended = [0] * 24, []

            async def one(i):
                sid = (await (await http.post("/streams")).json())["id"]
                try:
                    while True:
                        async with http.post(f"/streams/{sid}/steps",
                                             json={"x": [[0.1, 0.2, 0.3]]}) as r:
                            assert r.status in (200, 503), r.status
                            answered[i] += r.status == 200
                except aiohttp.ClientError:
                    ended.append(i)

            clients = [asyncio.ensure_future(one(i)) for i in range(24)]
            for _ in range(600):  # every stream is under way
                if min(answered) > 0:
                    break
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*clients), 30)
            return answered, ended

    try:
        answered, ended = asyncio.run(load())
        assert proc.wait(60) == 0  # its shutdown bound is 2 s; the rest is leaving Python
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(ended) == list(range(24)) and min(answered) > 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
