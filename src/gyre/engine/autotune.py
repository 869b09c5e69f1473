"""``backend="auto"`` by measurement: on the first call for a key, the eligible backends are timed
for a few calls each and the fastest is kept, in memory and in an on-disk cache (the role
``torch.backends.cudnn.benchmark`` plays for cuDNN).

* The key: the cell, the shape bucket (batch and sequence length rounded up to a power of two;
  input and hidden size exact), dtype, device, torch's thread count, the grad mode (``none``:
  forward only, ``params``: parameters' gradients, ``input``: the input's too), layers,
  directions and the layer options that change what a backend runs (lengths, dropout masks,
  zoneout, residual, per-step states).
* The disk cache is one JSON file per machine, torch version, gyre version and engine source
  (the backends' files, hashed: a choice measured on other kernels is measured again) under
  ``$GYRE_CACHE_DIR`` (default ``~/.cache/gyre``); a file that cannot be read or written is
  ignored (the choice is then kept in memory only).
* Cost is bounded: per backend :data:`WARMUP` untimed calls, one timed call and at most
  :data:`CALLS` more, fewer once a backend has used :data:`BUDGET_S` seconds; a backend whose
  first timed call takes more than :data:`GIVE_UP` times the best one's is not timed further.
  The untimed calls take the one-time costs (a kernel build or trace, a per-shape choice of
  product kernel, buffer pools and allocator arenas growing to the call's size: the first
  call sizes them, the second finds them sized), so they never drop a backend.
* The winner (:func:`decide`): the smallest of each backend's timed calls (other processes
  only ever add time to a call, so the fastest one is the least disturbed); a backend must beat
  one earlier in the static rule's order by more than :data:`MARGIN` to replace it.
* The timed calls alternate between the backends (round by round, the order reversed each
  round), so a change in the machine's speed meanwhile (other processes) weighs on every backend
  alike, and each backend's best call counts. With one torch thread the clock is the thread's CPU
  time (what the call itself used, not the time other processes held the core); with more, wall
  time.
* ``GYRE_AUTOTUNE=0`` keeps the static rule (:func:`gyre.engine.select_backend`); a forced
  ``backend=`` is never measured.
* Each choice is logged once at INFO level (logger ``gyre.engine``).

Every backend equals ``reference`` within its tolerance, so which one wins changes speed only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("gyre.engine")

#: untimed calls per backend before its timed ones
WARMUP = 2
#: timed rounds after each backend's first timed call (each backend once a round)
CALLS = 5
#: a backend is timed no further once its timed calls add up to this many seconds
BUDGET_S = 2.0
#: a backend whose first timed call takes this many times the best one's is timed no further
GIVE_UP = 3.0
#: a later backend in the static order wins only when its best call is this much faster
MARGIN = 0.02


def _default_clock() -> float:
    import torch

    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


#: the clock measurements read (a test replaces it)
clock: Callable[[], float] = _default_clock

_lock = threading.RLock()
_memory: dict[str, str] = {}
_disk: dict[str, str] | None = None


def enabled() -> bool:
    """False when ``GYRE_AUTOTUNE`` is ``0`` (or ``false``/``off``/``no``)."""
    return os.environ.get("GYRE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


_engine_hash: str | None = None


def engine_hash() -> str:
    """A hash of the engine's source files (its Python modules and the fused backend's C++)."""
    global _engine_hash
    if _engine_hash is None:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".h", ".cpp")):
            h.update(path.relative_to(root).as_posix().encode())
            with open(path, "rb") as f:
                h.update(f.read())
        _engine_hash = h.hexdigest()[:16]
    return _engine_hash


def cache_path() -> Path:
    """This machine's, torch's, gyre's and the engine source's cache file."""
    import torch

    try:
        from importlib.metadata import version

        gyre_version = version("gyre")
    except Exception:  # noqa: BLE001 - not installed as a distribution: a source checkout
        gyre_version = "source"

    machine = "|".join((platform.node(), platform.machine(), cpu_model()))
    tag = hashlib.sha256(f"{machine}|{torch.__version__}|{gyre_version}|{engine_hash()}"
                         .encode()).hexdigest()
    root = Path(os.environ.get("GYRE_CACHE_DIR") or Path.home() / ".cache" / "gyre")
    return root / f"autotune-{tag[:16]}.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_disk() -> dict[str, str]:
    global _disk
    if _disk is None:
        try:
            data = json.loads(cache_path().read_text())
            _disk = {k: v for k, v in data.items() if isinstance(v, str)} \
                if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _disk = {}
    return _disk


def _save_disk(key: str, choice: str) -> None:
    disk = _load_disk()
    disk[key] = choice
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(disk, indent=0, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice stays in memory


def forget() -> None:
    """Drop the choices held in memory (the disk cache is read again on the next call)."""
    global _disk
    with _lock:
        _memory.clear()
        _disk = None


def choose(key: str, candidates: Sequence[str], measure: Callable[[str], None]) -> str:
    """The backend for ``key`` among ``candidates`` (in the static rule's order of preference;
    the first wins ties): a choice already made (memory, then disk), else the fastest of
    ``measure(backend)`` calls (one run of the layer on that backend) timed by :data:`clock`."""
    if len(candidates) == 1:
        return candidates[0]
    with _lock:
        found = _memory.get(key) or _load_disk().get(key)
        if found in candidates:
            _memory[key] = found
            return found
        times: dict[str, list[float]] = {}
        spent: dict[str, float] = {}
        for backend in candidates:
            try:
                for _ in range(WARMUP):  # builds, traces, per-shape choices, pools, first touch
                    measure(backend)
                t0 = clock()
                measure(backend)  # what GIVE_UP judges: a run without the one-time costs
                first = clock() - t0
            except Exception as e:  # noqa: BLE001 - a backend failing here is not a candidate
                log.debug("gyre autotune: %s failed on %s (%s)", backend, key, e)
                continue
            best_so_far = min((min(t) for t in times.values()), default=None)
            times[backend] = [first]
            if best_so_far is None or first <= GIVE_UP * max(best_so_far, 1e-9):
                spent[backend] = first
        for r in range(CALLS):
            timed = [b for b in spent if spent[b] <= BUDGET_S]
            if len(timed) < 2:
                break  # nothing left to compare against
            for backend in timed if r % 2 == 0 else timed[::-1]:
                t0 = clock()
                measure(backend)
                dt = clock() - t0
                times[backend].append(dt)
                spent[backend] += dt
        if not times:
            return candidates[0]
        winner = decide(times, candidates)
        _memory[key] = winner
        _save_disk(key, winner)
        log.info("gyre autotune: %s -> %s (%s)", key, winner,
                 ", ".join(f"{b} {1e3 * min(t):.3g} ms (of {len(t)})" for b, t in times.items()))
        return winner


def decide(times: dict[str, Sequence[float]], candidates: Sequence[str]) -> str:
    """The winner from each backend's timed calls (seconds; a backend without any is out): the
    smallest best call, where a backend later in ``candidates`` (the static rule's order of
    preference) must beat the one it replaces by more than :data:`MARGIN`."""
    best = {b: min(times[b]) for b in candidates if times.get(b)}
    if not best:
        return candidates[0]
    winner = None
    for b in candidates:
        if b in best and (winner is None or best[b] < (1.0 - MARGIN) * best[winner]):
            winner = b
    return winner


__all__ = ["BUDGET_S", "CALLS", "GIVE_UP", "MARGIN", "WARMUP", "bucket", "cache_path", "choose",
           "decide", "enabled", "forget"]
