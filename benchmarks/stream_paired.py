"""Streaming cost, paired: gyre's ``layer.step(x_t, state)``, gyre's one-step ``forward``
(``layer(x_t[None], state)``, as torch users stream) and ``torch.nn``'s one-step forward with the
same weights, timed in alternating rounds in one process (so load on a shared machine hits all
three alike). Reports, per step, the minimum and median over rounds of the wall time and the
minimum of this thread's CPU time (``time.thread_time``: on a shared machine it leaves out the
time the process waited for a core), and checks that the three end in the same state.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_paired.py [--rounds 30] [--steps 200]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gyre.nn


def _pair(kind: str, I: int, H: int, layers: int):
    g = getattr(gyre.nn, kind)(I, H, layers).eval()
    t = getattr(torch.nn, kind)(I, H, layers).eval()
    t.load_state_dict(g.state_dict())
    return g, t


def _loop(fn, xs, state):
    for x in xs:
        _, state = fn(x, state)
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shape", default="1,64,128", help="B,I,H")
    ap.add_argument("--layers", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, I, H = (int(v) for v in args.shape.split(","))
    print(f"torch {torch.__version__}, {args.threads} thread(s), B={B} I={I} H={H} "
          f"layers={args.layers}, {args.steps} steps x {args.rounds} rounds (us per step)")
    for kind in ("LSTM", "GRU"):
        g, t = _pair(kind, I, H, args.layers)
        xs = torch.randn(args.steps, B, I)
        seq = [x[None] for x in xs]  # (1, B, I): one step of a time-major sequence
        impls = {
            "gyre step()": (g.step, list(xs)),
            "gyre forward T=1": (g, seq),
            f"torch.nn.{kind} T=1": (t, seq),
        }
        with torch.no_grad():
            finals = {name: _loop(fn, xs_, None) for name, (fn, xs_) in impls.items()}
            ref = finals[f"torch.nn.{kind} T=1"]
            for name, st in finals.items():
                for a, b in zip(st if isinstance(st, tuple) else (st,),
                                ref if isinstance(ref, tuple) else (ref,), strict=True):
                    err = (a - b).abs().max().item()
                    assert err < 1e-4, f"{kind} {name}: final state off torch by {err}"
            times: dict[str, list[float]] = {name: [] for name in impls}
            cpu: dict[str, list[float]] = {name: [] for name in impls}
            for _ in range(args.rounds):
                for name, (fn, xs_) in impls.items():
                    t0, c0 = time.perf_counter(), time.thread_time()
                    _loop(fn, xs_, None)
                    cpu[name].append((time.thread_time() - c0) / args.steps * 1e6)
                    times[name].append((time.perf_counter() - t0) / args.steps * 1e6)
        base = min(times[f"torch.nn.{kind} T=1"])
        cbase = min(cpu[f"torch.nn.{kind} T=1"])
        for name, ts in times.items():
            print(f"{kind:5s} {name:22s} wall min {min(ts):7.2f} median {statistics.median(ts):7.2f}"
                  f" [{min(ts) / base:.2f}x torch]  cpu min {min(cpu[name]):7.2f}"
                  f" [{min(cpu[name]) / cbase:.2f}x torch]")


if __name__ == "__main__":
    main()
