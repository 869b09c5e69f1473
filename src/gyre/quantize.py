"""int8 for a trained run: dynamic quantization of its exported ONNX graph by onnxruntime.

``quantize_dynamic`` with per-output-channel int8 weights: the input projection and the
recurrent weights of ONNX's own ``LSTM``/``GRU``/``RNN`` ops (``DynamicQuantizeLSTM`` for
LSTM), every ``MatMul``/``Gemm`` (the head, and the products inside a ``Scan`` body for other
cells); activations are quantized per call from their observed range. The accuracy (or the
task's metric) and the time over the run's test split are measured before and after, in the same
process, and saved with the run (``quantize.json``).
"""

from __future__ import annotations

from pathlib import Path

from .extras import need


def quantize_onnx(src: str | Path, dst: str | Path, *, per_channel: bool = True) -> Path:
    """Write the dynamic int8 version of the ONNX file ``src`` to ``dst``."""
    need("deploy", "onnxruntime", feature="gyre quantize")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"src: {str(src)!r} does not exist; expected an .onnx file")
    quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8,
                     extra_options={"MatMulConstBOnly": True})
    return dst


def quantize_run(task, out_dir, *, threads: int | None = 1, repeats: int = 3) -> dict:
    """Export the run (``model.onnx``) if needed, write ``model.int8.onnx``, and measure metric
    and test-split time for torch fp32, onnxruntime fp32 and onnxruntime int8 (best of
    ``repeats`` timed passes each). Writes and returns ``quantize.json``'s content."""
    from . import export
    from .tasks import base
    name = task.__name__.rsplit('.', 1)[-1]
    if name not in ("classify", "forecast"):  # the runs whose export score_test can run
        raise ValueError(f"quantize: task {name!r} is not covered; quantization is available "
                         "for classify and forecast runs")
    out = Path(out_dir)
    _, model, _ = task.load_run(out)
    fp32 = out / "model.onnx"
    export.onnx(model, fp32, lengths=True)
    int8 = quantize_onnx(fp32, out / "model.int8.onnx")
    runs = {"torch fp32": None, "onnxruntime fp32": export.OnnxModel(fp32, threads=threads),
            "onnxruntime int8": export.OnnxModel(int8, threads=threads)}
    rows = {}
    for name, run in runs.items():
        best = None
        for _ in range(repeats):
            scores, seconds = task.score_test(out, run)
            best = seconds if best is None else min(best, seconds)
        rows[name] = {**scores, "test_seconds": round(best, 4)}
    result = {"rows": rows, "fp32_file_bytes": fp32.stat().st_size,
              "int8_file_bytes": int8.stat().st_size,
              "speedup_int8_vs_onnx_fp32": round(rows["onnxruntime fp32"]["test_seconds"]
                                                 / rows["onnxruntime int8"]["test_seconds"], 3),
              "threads": threads}
    base.write_json(result, out / "quantize.json")
    return result


__all__ = ["quantize_onnx", "quantize_run"]
