"""Forward time of a 1-layer LSTM: gyre (torch) vs its ONNX export in onnxruntime, fp32 and
dynamic int8 (per channel), at (T, B, I, H); calls interleaved, min of N, one thread.

    .venv/bin/python benchmarks/deploy_speed.py [--shapes 100,32,64,128 50,128,512,512] [--n 7]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gyre.export import OnnxModel, onnx
from gyre.nn import LSTM
from gyre.quantize import quantize_onnx


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["100,32,64,128", "50,128,512,512"])
    p.add_argument("--n", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    for shape in a.shapes:
        T, B, I, H = (int(v) for v in shape.split(","))
        torch.manual_seed(0)
        m = LSTM(I, H).eval()
        f32 = onnx(m, tmp / "m.onnx")
        i8 = quantize_onnx(f32, tmp / "m.int8.onnx")
        runs = {"gyre": m, "ort_fp32": OnnxModel(f32, threads=1),
                "ort_int8": OnnxModel(i8, threads=1)}
        x = torch.randn(T, B, I)
        best = {k: float("inf") for k in runs}
        with torch.no_grad():
            ref = m(x)[0]
            err = {k: float((runs[k](x)[0] - ref).abs().max()) for k in runs}
            for _ in range(a.n):
                for k, fn in runs.items():
                    t0 = time.perf_counter()
                    fn(x)
                    best[k] = min(best[k], time.perf_counter() - t0)
        print(json.dumps({"shape": [T, B, I, H], "ms": {k: round(1000 * v, 2) for k, v in best.items()},
                          "int8_speedup_vs_ort_fp32": round(best["ort_fp32"] / best["ort_int8"], 2),
                          "int8_speedup_vs_gyre": round(best["gyre"] / best["ort_int8"], 2),
                          "max_abs_diff_vs_gyre": err}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
