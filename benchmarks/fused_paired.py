"""Training with the input's gradient, `fused` forced against the torch layer, paired in one
process: every round times each function once (thread CPU time, one thread), the order reversed
each round; the ratio is of the two minima. Variants set `gyre.engine.fused` module constants
before each fused call (e.g. `PACK_MIN_MACS=0`), to compare product-kernel choices in the same
window.

    python benchmarks/fused_paired.py --shapes "100,32,64,128;200,16,32,64" --cell lstm \
        [--layers 2 --bidirectional] [--variants "base;PACK_MIN_MACS=0"] [--reps 15]
"""

from __future__ import annotations

import argparse
import time

import torch

from gyre.bench.cases import build, inputs, make_fn
from gyre.engine import fused

CONSTANTS = ("PACK_MIN_MACS", "INPUT_PACK_MIN_MACS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", required=True, help="'T,B,I,H;T,B,I,H'")
    ap.add_argument("--cell", default="lstm")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--bidirectional", action="store_true")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = {k: getattr(fused, k) for k in CONSTANTS}

    def setv(v: str) -> None:
        for k, val in base.items():
            setattr(fused, k, val)
        if v != "base":
            for kv in v.split(","):
                k, val = kv.split("=")
                if k not in CONSTANTS:
                    raise SystemExit(f"--variants: {k!r} is not one of {', '.join(CONSTANTS)}")
                setattr(fused, k, int(val))

    for shape in args.shapes.split(";"):
        T, B, I, H = map(int, shape.split(","))
        x = inputs(T, B, I)
        torch_cls = torch.nn.GRU if args.cell == "gru" else torch.nn.LSTM
        torch.manual_seed(0)
        ref = torch_cls(I, H, num_layers=args.layers, bidirectional=args.bidirectional)
        m = build(args.cell, "fused", I, H, 0, args.layers, args.bidirectional)
        fm = make_fn(m, "train", x)
        fns = {"torch": make_fn(ref, "train", x)}
        for v in args.variants.split(";"):
            fns[v] = lambda v=v, fm=fm: (setv(v), fm())
        for f in fns.values():
            f()
            f()
        best = dict.fromkeys(fns, float("inf"))
        for r in range(args.reps):
            for k, f in (fns.items() if r % 2 == 0 else reversed(fns.items())):
                t0 = time.thread_time()
                f()
                best[k] = min(best[k], time.thread_time() - t0)
        cols = " | ".join(f"{k} {v * 1e3:.2f} ms {v / best['torch']:.3f}x" for k, v in best.items())
        print(f"{args.cell} L{args.layers}{' bi' if args.bidirectional else ''} {shape}: {cols}",
              flush=True)


if __name__ == "__main__":
    main()
