"""``gyre bench``: gyre's layers against ``torch.nn`` and an eager loop of the same cell.

One run on one machine times, for every cell and shape, forward without grad (``fwd``),
forward+backward (``train``) and streaming (``stream``: ``T=1, B=1`` steps with carried state
through ``layer.step``), for

* ``torch``: ``torch.nn.RNN/LSTM/GRU`` (cells torch lacks are compared with ``torch.nn.LSTM``),
* ``eager``: an eager torch loop of the cell (gyre's ``reference`` backend),
* ``auto``: gyre's default backend, and optionally each backend (``backends=``),

with min-of-N timings after warm-up (:mod:`gyre.bench.harness`; each gyre layer timed in
alternation with the torch layer it is compared with, so a ratio never spans a change in the
machine's speed), GFLOP/s against the sgemm
ceiling measured in the same run, and a numerics check of every timed gyre layer against torch
with the same weights (:func:`gyre.bench.cases.check`). Results go to JSON under
``benchmarks/results/``; :func:`write_markdown` renders ``BENCHMARKS.md`` from the latest.

Python: ``gyre.bench.run(cells=["lstm"], shapes=[(100, 32, 64, 128)])``; command line:
``gyre bench --quick`` or ``python -m gyre.bench --help``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import engine
from ..engine import autotune
from . import cases, harness, report
from .cases import CELLS, LONG_LENGTHS, MODES, SHAPES, STACKS, STREAM_SHAPE
from .harness import Timing

RESULTS_DIR = Path("benchmarks/results")
QUICK_SHAPES = ((20, 4, 16, 32),)
QUICK_LONG = ((64, 128), (2, 16, 16))  # lengths, (B, I, H) of the long section in a quick run
ALL_MODES = (*MODES, "stream", "long")


def gyre_backends() -> list[str]:
    """Every engine backend a run can force (``auto`` and ``reference``, timed as ``eager``, are
    always there)."""
    return [b for b in engine.BACKENDS if b not in ("auto", "reference")]


def run(
    cells: Sequence[str] = CELLS,
    shapes: Sequence[tuple[int, int, int, int]] = SHAPES,
    modes: Sequence[str] = ALL_MODES,
    backends: Sequence[str] = (),
    *,
    stacks: Sequence[tuple[str, int, bool]] = STACKS,
    long_lengths: Sequence[int] = LONG_LENGTHS,
    long_shape: tuple[int, int, int] = cases.LONG_SHAPE,
    threads: int = 2,
    stream_steps: int = 1000,
    timing: Timing | None = None,
    check: bool = True,
    gemm: bool = True,
    wait_quiet: float = 0.0,
    notes: str = "",
    autotune_on: bool = True,
    eager: bool = True,
    log=print,
) -> dict:
    """Run the benchmark; returns the JSON-ready record (see the module docstring).

    ``backends``: gyre backends to time besides ``auto`` (see :func:`gyre_backends`).
    ``stacks``: ``(cell, layers, bidirectional)`` configurations also timed at every shape in
    ``fwd``/``train``/``train-params`` (of ``cells`` only). ``long``: forward+backward with the
    input's gradient and peak memory at each of ``long_lengths`` at ``long_shape`` ``(B, I, H)``
    (:data:`gyre.bench.cases.LONG_IMPLS`), timed alone (each call takes seconds).
    ``check``: compare every timed gyre layer with torch / the eager loop (same weights).
    ``wait_quiet``: before each group of cases wait up to this many seconds for the rest of the
    machine to go idle (each case records the CPU share other processes took while it ran).
    ``eager``: also time the eager loop (the slowest column; off to save a run's time).
    ``autotune_on``: ``auto`` as gyre's default runs it, autotuned, its choices measured afresh in
    this run (a private autotune cache for the run, so choices another run or process made are
    not reused); the "auto runs" column shows what it chose. Off: the static rule
    (``GYRE_AUTOTUNE=0``).
    """
    timing = timing or Timing()
    cells, shapes, modes, backends = _validate(cells, shapes, modes, backends, threads,
                                               stream_steps, timing)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    impls = ["torch", *(["eager"] if eager else []), "auto", *backends]
    record = {
        "meta": {**harness.machine_info(threads), "argv": sys.argv, "notes": notes,
                 "spec": {"cells": list(cells), "shapes": [list(s) for s in shapes],
                          "modes": list(modes), "impls": impls, "stream_shape": list(STREAM_SHAPE),
                          "stream_steps": stream_steps, "timing": vars(timing),
                          "stacks": [list(st) for st in stacks],
                          "long_lengths": list(long_lengths), "long_shape": list(long_shape),
                          "flops": "fwd 2*T*B*G*H*(I+H) (G=4 LSTM, 3 GRU, 1 RNN; minGRU/minLSTM "
                                   "no H term; rnn_output + 2*T*B*H*H), summed over the "
                                   "layers and directions of a stack; train 3x fwd"}},
        "gemm": [], "results": [], "long": [], "errors": [],
    }
    record["meta"]["autotune"] = bool(autotune_on)
    noise = harness.CpuNoise()
    saved_env = {k: os.environ.get(k) for k in ("GYRE_AUTOTUNE", "GYRE_CACHE_DIR")}
    cache_dir = tempfile.TemporaryDirectory(prefix="gyre-bench-autotune-")
    os.environ["GYRE_AUTOTUNE"] = "1" if autotune_on else "0"
    os.environ["GYRE_CACHE_DIR"] = cache_dir.name
    autotune.forget()
    try:
        if wait_quiet:
            harness.wait_quiet(wait_quiet, log=log)
        if gemm:
            log("[gemm] measuring the sgemm ceiling (torch.mm)")
            stream = [STREAM_SHAPE] if "stream" in modes else []
            record["gemm"] = harness.gemm_ceiling(list(shapes) + stream, timing)
            for g in record["gemm"]:
                log(f"[gemm] {g['gemm']}: {g['gflops_per_s']:.1f} GFLOP/s")
        torch_cache: dict[tuple, dict] = {}
        for mode in modes:
            if mode == "long":
                continue
            mode_shapes = [STREAM_SHAPE] if mode == "stream" else list(shapes)
            configs = [(c, 1, False) for c in cells]
            if mode != "stream":
                configs += [st for st in stacks if st[0] in cells]
            for shape in mode_shapes:
                for cell, layers, bidir in configs:
                    if wait_quiet:
                        harness.wait_quiet(wait_quiet, log=log)
                    _run_case(record, torch_cache, cell, mode, shape, impls, timing,
                              stream_steps, check, log, layers, bidir)
        if "long" in modes:
            _run_long(record, long_lengths, long_shape, timing, wait_quiet, log)
    finally:
        torch.set_num_threads(prev_threads)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        autotune.forget()
        cache_dir.cleanup()
    record["noise"] = noise.result()
    try:
        record["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return record


def _run_case(record, torch_cache, cell, mode, shape, impls, timing, stream_steps, check, log,
              layers=1, bidir=False):
    T, B, I, H = shape
    steps = stream_steps if mode == "stream" else None
    x = cases.inputs(steps if mode == "stream" else T, B, I)
    train = 3.0 if mode in cases.TRAIN_MODES else 1.0
    flops = cases.flops_stack(cell, T, B, I, H, layers, bidir) * train
    timed_backend: dict[str, dict] = {}  # gyre backend -> its record, so no backend runs twice
    base = {"cell": cell, "mode": mode, "T": T, "B": B, "I": I, "H": H}
    if layers > 1 or bidir:
        base.update(layers=layers, bidirectional=bidir)
    if mode == "stream":
        base["steps"] = steps
    base_fn = None  # the torch layer of the case, timed in alternation with each gyre layer
    for impl in impls:
        rec = {**base, "impl": impl}
        try:
            if impl == "torch":
                cls = cases.torch_class(cell)
                rec["layer"] = f"torch.nn.{cls.__name__}"
                key = (cls, mode, shape, layers, bidir)
                if key not in torch_cache:
                    m = cases.build(cell, "torch", I, H, layers=layers, bidirectional=bidir)
                    fl = cases.flops_stack(cls.__name__.lower(), T, B, I, H, layers, bidir)
                    fl *= train
                    torch_cache[key] = (_time(m, mode, x, timing, fl, steps),
                                        cases.make_fn(m, mode, x))
                rec.update(torch_cache[key][0])
                base_fn = torch_cache[key][1]
            else:
                m = None
                if impl == "auto":  # what auto runs: autotune's choice, made by this first call
                    m = cases.build(cell, impl, I, H, layers=layers, bidirectional=bidir)
                    backend = cases.auto_backend(m, mode, x)
                    rec["chosen_by"] = "autotune" if autotune.enabled() else "static rule"
                else:
                    backend = cases.gyre_backend(cell, impl, mode, B, H)
                if backend is None:
                    continue  # this backend cannot run this cell: nothing to time
                rec["backend"] = backend
                rec["layer"] = f"gyre.nn.Recurrent({cell!r}, backend={backend!r})"
                if backend in timed_backend:
                    same = timed_backend[backend]
                    rec.update({k: same[k] for k in ("min_s", "median_s", "n", "first_call_s",
                                                     "per_step_s", "gflops_per_s", "check",
                                                     "foreign_cpu_frac", "torch_paired_min_s")
                                if k in same})
                    rec["same_as"] = same["impl"]
                else:
                    if m is None:
                        m = cases.build(cell, impl, I, H, layers=layers, bidirectional=bidir)
                    if check and (cell in cases.TORCH_EXACT or backend != "reference"):
                        rec["check"] = cases.check(cell, m, mode, x)
                    elif check:  # the eager loop of a cell torch lacks is itself the reference
                        rec["check"] = {"against": "none: this is the reference"}
                    rec.update(_time(m, mode, x, timing, flops, steps, base_fn))
                    timed_backend[backend] = rec
                    if mode == "stream" and m.step_compiled:
                        rec["backend"] = "fused"  # layer.step's compiled step, whatever forward runs
        except Exception as e:  # a failing implementation is recorded, the run goes on
            record["errors"].append({**rec, "error": f"{type(e).__name__}: {e}"})
            log(f"[error] {cell} {mode} {shape} {impl}: {type(e).__name__}: {e}")
            continue
        record["results"].append(rec)
        log(_line(rec))


def _run_long(record, lengths, shape, timing, wait_quiet, log) -> None:
    """The long-sequence section: forward+backward (input gradient included) of each of
    :data:`~gyre.bench.cases.LONG_IMPLS` at every length, its peak memory and GFLOP/s (FLOPs
    from the cell's parameter specs, :func:`~gyre.bench.cases.flops_params`)."""
    B, I, H = shape
    long_timing = Timing(warmup=1, reps=min(timing.reps, 3), min_window_s=0.0,
                         max_case_s=timing.max_case_s, min_reps=1, clock=timing.clock)
    for T in lengths:
        x = cases.inputs(T, B, I)
        for cell, impl in cases.LONG_IMPLS:
            rec = {"cell": cell, "impl": impl, "T": T, "B": B, "I": I, "H": H}
            try:
                if impl == "torch":
                    rec["layer"] = "torch.nn.LSTM"
                m = cases.build(cell, impl, I, H)
                if impl != "torch":
                    backend = cases.auto_backend(m, "train", x) if impl == "auto" else \
                        cases.gyre_backend(cell, impl, "train", B, H)
                    if backend is None:
                        continue
                    rec["backend"] = backend
                    rec["layer"] = f"gyre.nn.Recurrent({cell!r}, backend={backend!r})"
                if wait_quiet:
                    harness.wait_quiet(wait_quiet, log=log)
                fn = cases.make_fn(m, "train", x)
                rec["peak_bytes"] = harness.peak_memory(fn)
                noise = harness.CpuNoise()
                rec.update(harness.time_fn(fn, long_timing))
                busy = noise.result()
                rec["foreign_cpu_frac"] = None if busy is None else busy["foreign_cpu_frac"]
                rec["gflops_per_s"] = 3.0 * cases.flops_params(cell, T, B, I, H) / rec["min_s"] / 1e9
            except Exception as e:  # recorded, the run goes on
                record["errors"].append({**rec, "mode": "long", "error": f"{type(e).__name__}: {e}"})
                log(f"[error] {cell} long T={T} {impl}: {type(e).__name__}: {e}")
                continue
            record["long"].append(rec)
            mem = rec["peak_bytes"]
            log(f"{cell:>10}   long {T},{B},{I},{H} {impl:>18}: {rec['min_s'] * 1e3:.1f} ms  "
                f"{rec['gflops_per_s']:.1f} GFLOP/s  peak "
                + ("n/a" if mem is None else f"{mem / 2**20:.0f} MiB"))


def _time(m, mode, x, timing, flops, steps, base_fn=None) -> dict:
    """Time ``m``; with ``base_fn`` (the torch layer of the case) in alternation with it, its
    minimum from the same window kept as ``torch_paired_min_s`` (per step when streaming)."""
    noise = harness.CpuNoise()
    fn = cases.make_fn(m, mode, x)
    if base_fn is None:
        r = harness.time_fn(fn, timing)
    else:
        r = harness.time_pair(fn, base_fn, timing)
        r["torch_paired_min_s"] = r.pop("base_min_s") / (steps or 1)
        r.pop("base_median_s")
    busy = noise.result()
    r["foreign_cpu_frac"] = None if busy is None else busy["foreign_cpu_frac"]
    per = r["min_s"] / steps if steps else r["min_s"]
    r["gflops_per_s"] = flops / per / 1e9
    if steps:
        r["per_step_s"] = per
    return r


def _line(rec) -> str:
    t = rec.get("per_step_s", rec["min_s"])
    unit = f"{t * 1e6:.1f} us/step" if rec["mode"] == "stream" else f"{t * 1e3:.3f} ms"
    chk = rec.get("check") or {}
    err = chk.get("out_max_abs_err")
    extra = "" if err is None else f"  |out err| {err:.1e}"
    if "grad_max_rel_err" in chk:
        extra += f"  grad err {chk['grad_max_rel_err']:.1e}"
    who = rec["impl"] + (f"[{rec['backend']}]" if "backend" in rec else "")
    same = f" (= {rec['same_as']})" if "same_as" in rec else ""
    return (f"{report.label(rec):>10} {rec['mode']:>6} {rec['T']},{rec['B']},{rec['I']},{rec['H']}"
            f" {who:>18}: {unit}{same}  {rec['gflops_per_s']:.1f} GFLOP/s{extra}")


def _validate(cells, shapes, modes, backends, threads, stream_steps, timing):
    cells = list(cells)
    bad = [c for c in cells if c not in CELLS]
    if bad or not cells:
        raise ValueError(f"cells: got {bad or cells}, expected names from {', '.join(CELLS)}")
    shapes = [tuple(s) for s in shapes]
    for s in shapes:
        if len(s) != 4 or not all(isinstance(v, int) and v >= 1 for v in s):
            raise ValueError(f"shapes: got {s!r}, expected (T, B, I, H) positive integers")
    modes = list(modes)
    if not modes or any(m not in ALL_MODES for m in modes):
        raise ValueError(f"modes: got {modes}, expected some of {', '.join(ALL_MODES)}")
    if not shapes and any(m not in ("stream", "long") for m in modes):
        raise ValueError("shapes: got none, expected at least one (T, B, I, H) for fwd/train")
    backends = list(backends)
    known = gyre_backends()
    bad = [b for b in backends if b not in known]
    if bad:
        raise ValueError(f"backends: got {bad}, expected some of {', '.join(known)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: got {threads!r}, expected an int >= 1")
    if timing.clock == "cpu" and threads != 1:
        raise ValueError(f"clock: 'cpu' times the calling thread only, so it needs threads=1; "
                         f"got threads={threads}")
    if isinstance(stream_steps, bool) or not isinstance(stream_steps, int) or stream_steps < 1:
        raise ValueError(f"stream_steps: got {stream_steps!r}, expected an int >= 1")
    return cells, shapes, modes, backends


def save(record: dict, path: str | os.PathLike | None = None) -> Path:
    """Write ``record`` as JSON (default ``benchmarks/results/bench-<UTC time>.json``),
    atomically; returns the path."""
    if path is None:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS_DIR / f"bench-{stamp}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def latest(results_dir: str | os.PathLike = RESULTS_DIR) -> Path:
    """The newest ``*.json`` under ``results_dir`` (by the date its run recorded)."""
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"results_dir: no *.json in {results_dir}; run `gyre bench` first")

    def when(p):
        try:
            return json.loads(p.read_text())["meta"]["date"]
        except (ValueError, KeyError, TypeError):
            return ""
    return max(files, key=lambda p: (when(p), p.name))


def write_markdown(json_path: str | os.PathLike | None = None,
                   out: str | os.PathLike = "BENCHMARKS.md",
                   results_dir: str | os.PathLike = RESULTS_DIR, notes: str = "") -> Path:
    """Regenerate ``BENCHMARKS.md`` from a results JSON (default: the latest one); ``notes``:
    text added under the run's own notes."""
    src = Path(json_path) if json_path is not None else latest(results_dir)
    record = json.loads(src.read_text())
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(report.markdown(record, source=str(src), extra_notes=notes))
    os.replace(tmp, out)
    return out


def _parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        try:
            vals = tuple(int(v) for v in part.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--shapes: got {part!r}, expected T,B,I,H integers (several separated by ';')"
            ) from None
        if len(vals) != 4:
            raise argparse.ArgumentTypeError(f"--shapes: got {part!r}, expected 4 integers T,B,I,H")
        shapes.append(vals)
    return shapes


def _parse_list(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    """``gyre bench``: run the benchmark, print the tables, write the JSON."""
    ap = argparse.ArgumentParser(
        prog="gyre bench",
        description="Time gyre's layers against torch.nn and an eager loop of the same cell.")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: one small shape, 20 stream steps, 1 warm-up, 2 reps")
    ap.add_argument("--cells", type=_parse_list, default=list(CELLS),
                    help=f"comma-separated, from {','.join(CELLS)} (default: all)")
    ap.add_argument("--shapes", type=_parse_shapes, default=None,
                    help="'T,B,I,H;T,B,I,H' (default: the four standard shapes)")
    ap.add_argument("--modes", type=_parse_list, default=list(ALL_MODES),
                    help=f"comma-separated, from {','.join(ALL_MODES)} (default: all); train "
                         "computes the input's gradient too, train-params the parameters' only; "
                         "long: the long-sequence section")
    ap.add_argument("--long-lengths", type=_parse_list, default=None,
                    help="sequence lengths of the long section, comma-separated (default "
                         f"{','.join(map(str, LONG_LENGTHS))}; quick: "
                         f"{','.join(map(str, QUICK_LONG[0]))})")
    ap.add_argument("--no-stacks", action="store_true",
                    help="skip the 2-layer bidirectional rows")
    ap.add_argument("--backends", type=_parse_list, default=[],
                    help=f"gyre backends to time besides auto: {','.join(gyre_backends())} "
                         "or 'all'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stream-steps", type=int, default=None, help="default 1000 (quick: 20)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls at least (default 5)")
    ap.add_argument("--min-window", type=float, default=None,
                    help="seconds of timed calls at least, per case (default 0.5)")
    ap.add_argument("--max-case-seconds", type=float, default=None,
                    help="stop timing a case after this once 3 samples exist (default 6)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="a call's time: elapsed (default), or the calling thread's CPU time "
                         "(needs --threads 1; for a machine other processes share: time spent "
                         "descheduled is not counted)")
    ap.add_argument("--no-eager", action="store_true",
                    help="do not time the eager loop (the slowest column)")
    ap.add_argument("--no-check", action="store_true", help="skip the numerics checks")
    ap.add_argument("--no-gemm", action="store_true", help="skip the sgemm ceiling")
    ap.add_argument("--no-autotune", action="store_true",
                    help="auto on the static rule (GYRE_AUTOTUNE=0); by default auto is "
                         "autotuned, its choices measured afresh in the run")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each group of cases, wait up to SECONDS for other processes "
                         "to go idle (default: do not wait)")
    ap.add_argument("--json", default=None,
                    help="output JSON (default benchmarks/results/bench-<UTC time>.json)")
    ap.add_argument("--no-json", action="store_true", help="write no JSON")
    ap.add_argument("--markdown", default=None, metavar="PATH",
                    help="also render this run as markdown to PATH (e.g. BENCHMARKS.md)")
    ap.add_argument("--notes", default="",
                    help="free text stored with the run and rendered (with --render-md: added "
                         "to the rendered file only)")
    ap.add_argument("--render-md", nargs="?", const="", default=None, metavar="JSON",
                    help="run nothing: regenerate BENCHMARKS.md from JSON (default: the latest "
                         "under benchmarks/results/)")
    args = ap.parse_args(argv)

    if args.render_md is not None:
        out = write_markdown(args.render_md or None, args.markdown or "BENCHMARKS.md",
                             notes=args.notes)
        print(f"wrote {out}")
        return 0
    backends = gyre_backends() if args.backends == ["all"] else args.backends
    base = Timing.quick() if args.quick else Timing()
    timing = Timing(
        warmup=base.warmup,
        reps=args.reps if args.reps is not None else base.reps,
        min_window_s=args.min_window if args.min_window is not None else base.min_window_s,
        max_case_s=(args.max_case_seconds if args.max_case_seconds is not None
                    else base.max_case_s),
        min_reps=base.min_reps,
        clock=args.clock,
    )
    shapes = args.shapes if args.shapes is not None else (QUICK_SHAPES if args.quick else SHAPES)
    steps = args.stream_steps if args.stream_steps is not None else (20 if args.quick else 1000)
    try:
        lengths = [int(v) for v in args.long_lengths] if args.long_lengths else \
            list(QUICK_LONG[0] if args.quick else LONG_LENGTHS)
    except ValueError:
        ap.error(f"--long-lengths: got {args.long_lengths}, expected integers")
    try:
        record = run(args.cells, shapes, args.modes, backends, threads=args.threads,
                     stacks=() if args.no_stacks else STACKS, long_lengths=lengths,
                     long_shape=QUICK_LONG[1] if args.quick else cases.LONG_SHAPE,
                     stream_steps=steps, timing=timing, check=not args.no_check,
                     gemm=not args.no_gemm, wait_quiet=args.wait_quiet, notes=args.notes,
                     autotune_on=not args.no_autotune, eager=not args.no_eager)
    except ValueError as e:
        ap.error(str(e))
    text = report.markdown(record)
    print()
    print(text)
    if not args.no_json:
        path = save(record, args.json)
        print(f"wrote {path}")
    if args.markdown:
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")
    return 1 if record["errors"] else 0


__all__ = ["CELLS", "SHAPES", "Timing", "gyre_backends", "latest", "main", "run", "save",
           "write_markdown"]
