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
    import time
    assert s.evict_idle() == []
    assert set(s.evict_idle(time.monotonic() + 11)) == {a, b}
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
