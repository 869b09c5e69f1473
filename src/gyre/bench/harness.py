"""Timing harness shared by every benchmark case: min-of-N after warm-up, the sgemm ceiling,
machine description and a measure of how busy the rest of the machine was.

The protocol follows ``../shared/tools/peer_bench`` so its numbers and gyre's compare: a few
untimed warm-up calls, then at least ``reps`` timed calls and at least ``min_window_s`` seconds
of them (samples spread over time, so one burst of host noise cannot spoil all of them), stopping
after ``max_case_s`` once three samples exist. The minimum is the estimate. Gyre's layers are
timed in alternation with the torch layer they are compared with (:func:`time_pair`), and their
ratio is the ratio of the two minima from the same window.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter

import torch

from ..engine.autotune import cpu_model


@dataclass(frozen=True)
class Timing:
    """How hard to time: see the module docstring."""

    warmup: int = 3
    reps: int = 5
    min_window_s: float = 0.5
    max_case_s: float = 6.0
    min_reps: int = 3
    max_reps: int = 2000
    #: what a call's time is: ``"wall"`` (elapsed), or ``"cpu"``: the calling thread's CPU time,
    #: for single-threaded runs on a machine other processes share (time spent descheduled is
    #: not counted; with more threads it would miss the workers' time, so runs refuse it)
    clock: str = "wall"

    @classmethod
    def quick(cls) -> Timing:
        return cls(warmup=1, reps=2, min_window_s=0.0, max_case_s=0.5, min_reps=1)


def time_fn(fn: Callable[[], object], timing: Timing) -> dict:
    """``min_s``, ``median_s``, ``n`` (timed calls) and ``first_call_s`` (includes any
    compilation or kernel build on first use) of ``fn()``."""
    return _timed(fn, None, timing)


def time_pair(fn: Callable[[], object], base: Callable[[], object], timing: Timing) -> dict:
    """:func:`time_fn` of ``fn`` with every timed call alternating with a call of ``base`` (the
    order swapped each round), so both see the same state of the machine: ``fn``'s ``min_s``,
    ``median_s``, ``n``, ``first_call_s`` and ``base``'s ``base_min_s`` / ``base_median_s``.
    On a VM whose speed drifts by tens of percent over minutes, the ratio of the two minima holds
    where the ratio to a time taken earlier does not."""
    return _timed(fn, base, timing)


def clock_of(timing: Timing) -> Callable[[], float]:
    """The clock a call's time is read from (see :attr:`Timing.clock`)."""
    if timing.clock not in ("wall", "cpu"):
        raise ValueError(f"clock: got {timing.clock!r}, expected 'wall' or 'cpu'")
    return time.thread_time if timing.clock == "cpu" else perf_counter


def _timed(fn: Callable[[], object], base: Callable[[], object] | None, timing: Timing) -> dict:
    clock = clock_of(timing)
    first = None
    for i in range(max(1, timing.warmup)):
        t0 = clock()
        fn()
        if i == 0:
            first = clock() - t0
        if base is not None:
            base()
    times: list[float] = []
    base_times: list[float] = []
    start = perf_counter()
    while True:
        order = (fn,) if base is None else (fn, base) if len(times) % 2 == 0 else (base, fn)
        for which in order:
            t0 = clock()
            which()
            (times if which is fn else base_times).append(clock() - t0)
        elapsed = perf_counter() - start
        if len(times) >= timing.min_reps and elapsed > timing.max_case_s:
            break
        if len(times) >= timing.reps and (elapsed >= timing.min_window_s
                                          or len(times) >= timing.max_reps):
            break
    out = {"min_s": min(times), "median_s": statistics.median(times), "n": len(times),
           "first_call_s": first}
    if base is not None:
        out.update(base_min_s=min(base_times), base_median_s=statistics.median(base_times))
    return out


def gemm_ceiling(shapes: list[tuple[int, int, int, int]], timing: Timing,
                 square: int = 2048) -> list[dict]:
    """GFLOP/s of ``torch.mm`` (fp32) at ``square^3`` and at each shape's recurrent GEMM
    ``(B, H) @ (H, 4H)``: the ceiling the recurrent layers are measured against."""
    gemms = [("square", square, square, square)]
    for (_, B, _, H) in shapes:
        gemms.append((f"recurrent (B,H)@(H,4H) B={B} H={H}", B, H, 4 * H))
    out, seen = [], set()
    for name, M, K, N in gemms:
        if (M, K, N) in seen:
            continue
        seen.add((M, K, N))
        a, b, c = torch.randn(M, K), torch.randn(K, N), torch.empty(M, N)
        t0 = perf_counter()
        torch.mm(a, b, out=c)
        one = max(perf_counter() - t0, 1e-7)
        inner = max(1, min(100_000, int(0.02 / one)))  # one sample >= ~20 ms

        def fn(a=a, b=b, c=c, inner=inner):
            for _ in range(inner):
                torch.mm(a, b, out=c)

        r = time_fn(fn, Timing(warmup=min(2, timing.warmup), reps=max(2, timing.reps),
                               min_window_s=timing.min_window_s,
                               max_case_s=min(3.0, timing.max_case_s), min_reps=timing.min_reps,
                               clock=timing.clock))
        per = r["min_s"] / inner
        out.append({"gemm": name, "M": M, "K": K, "N": N, "s_per_mm": per,
                    "gflops_per_s": 2.0 * M * K * N / per / 1e9})
    return out



def cpu_flags() -> list[str]:
    """The vector extensions that matter for GEMM speed."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return sorted(have & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"})
    except OSError:
        pass
    return []


def machine_info(threads: int) -> dict:
    import gyre

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "torch_mkldnn": torch.backends.mkldnn.is_available(),
        "gyre": getattr(gyre, "__version__", None) or _dist_version("gyre"),
        "gyre_commit": _git_commit(os.path.dirname(gyre.__file__)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": None if load is None else [round(v, 2) for v in load],
    }


def _git_commit(path: str) -> str | None:
    """The commit of the checkout gyre runs from (with ``+dirty`` when files differ from it),
    or None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, text=True,
                              capture_output=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=path, text=True, capture_output=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - metadata is optional
        return None


class CpuNoise:
    """Share of the machine's CPU time used by other processes while we ran (from
    ``/proc/stat`` minus our own process time): above a few percent, timings are suspect."""

    def __init__(self) -> None:
        self._stat0 = _proc_stat()
        self._own0 = _own_cpu()
        self._t0 = perf_counter()

    def result(self) -> dict | None:
        stat1 = _proc_stat()
        if self._stat0 is None or stat1 is None:
            return None
        d = [b - a for a, b in zip(self._stat0, stat1, strict=False)]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (d[0] + d[1] + d[2] + d[5] + d[6]) / hz
        own = _own_cpu() - self._own0
        wall = perf_counter() - self._t0
        ncpu = os.cpu_count() or 1
        total = sum(d) or 1
        return {"foreign_cpu_frac": round(max(0.0, busy - own) / max(wall * ncpu, 1e-9), 4),
                "steal_frac": round(d[7] / total, 4) if len(d) > 7 else None,
                "wall_s": round(wall, 2)}


def _proc_stat() -> list[int] | None:
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def wait_quiet(max_wait_s: float, threshold: float = 0.05, sample_s: float = 1.0, log=print) -> float:
    """Block until processes use less than ``threshold`` of the machine's CPU over ``sample_s``
    (we are idle while waiting, so that is all other processes), or ``max_wait_s`` passed.
    Returns the last busy fraction measured."""
    end = perf_counter() + max_wait_s
    said = False
    while True:
        a = _proc_stat()
        time.sleep(sample_s)
        b = _proc_stat()
        if a is None or b is None:
            return 0.0
        d = [y - x for x, y in zip(a, b, strict=False)]
        busy = (d[0] + d[1] + d[2] + d[5] + d[6]) / max(sum(d), 1)
        if busy < threshold or perf_counter() > end:
            if busy >= threshold:
                log(f"[wait] machine still {busy:.0%} busy after {max_wait_s:.0f} s; going on")
            return busy
        if not said:
            log(f"[wait] machine {busy:.0%} busy with other processes; waiting up to "
                f"{max_wait_s:.0f} s")
            said = True


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Bytes of resident memory ``fn()`` adds at its peak over what the process held before it
    (Linux: the peak RSS is reset through ``/proc/self/clear_refs``), or None where that cannot
    be measured. Large CPU tensors are mapped and unmapped per allocation, so this follows what
    a call holds at once."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
    except OSError:
        return None
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def _status_kib(field: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None
