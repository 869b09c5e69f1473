"""Compiling generated kernels: lazily, once, cached in torch's extension directory.

Every built-in cell's kernels (with and without biases) go into one extension module, so a
fresh machine compiles once for all of them; any other cell gets a small module of its own.
A module is named after a hash of its generated source, the runtime it includes (``csrc/``), the
compiler flags, the CPU and the torch install, so a cached build is reused exactly when it would
come out the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import sys
import threading

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock of gyre's own (torch's lock file alone)
    fcntl = None

from .codegen import CSRC, module_source, runtime_text

# -fopenmp: ATen's parallel_for is a header template that runs serially without it (it then
# links the libgomp torch already loaded). -mprefer-vector-width=512: GCC vectorizes for 256-bit
# registers on AVX-512 CPUs unless asked, and the pointwise loops (their exp and tanh from
# libmvec included) then run at half width (measured: LSTM training at (100,32,64,128) 7% faster,
# one thread); without AVX-512 the flag changes nothing.
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp",
         "-fno-math-errno", "-w"]

_lock = threading.RLock()
_loaded: dict[str, str] = {}  # module name -> namespace (loaded in this process)
_python: dict[str, object] = {}  # module name -> its Python module (the streaming entry)


class BuildError(RuntimeError):
    """The C++ toolchain is missing or failed."""


def _cpu_id() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


@contextlib.contextmanager
def _build_lock(build_dir: str):
    """Held across processes while a module is written and loaded. torch's own guard is a
    ``lock`` file that a build killed midway (Ctrl-C, a timeout, kill -9) leaves behind, and every
    later load of that module then waits on it forever. This lock is the kernel's (``flock``):
    it goes when its holder dies. Every gyre build runs inside it, so a ``lock`` file found by
    the holder is stale, and is removed."""
    if fcntl is None:
        yield
        return
    with open(os.path.join(build_dir, "gyre.flock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(build_dir, "lock"))
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_outputs(build_dir: str) -> None:
    """Everything a build wrote in ``build_dir`` except the sources (objects, library, ninja's
    state), so that the next build starts from the sources alone."""
    for entry in os.listdir(build_dir):
        if entry.endswith((".o", ".so", ".ninja", ".ninja_deps", ".ninja_log")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(build_dir, entry))


def module_name(programs: dict[str, str]) -> str:
    h = hashlib.sha256()
    # torch's location too: the build command names its include directories, so two
    # installs (virtual environments) sharing the extension cache would otherwise rewrite each
    # other's build file and recompile the same module on every first load
    for part in (torch.__version__, os.path.dirname(torch.__file__), " ".join(FLAGS), _cpu_id(),
                 runtime_text(), module_source("NS", programs)):
        h.update(part.encode())
    return "gyre_fused_" + h.hexdigest()[:16]


def load(programs: dict[str, str], what: str) -> str:
    """Build (or reuse) the module holding ``programs`` and return its ``torch.ops`` namespace."""
    name = module_name(programs)
    with _lock:
        if name in _loaded:
            return _loaded[name]
        from torch.utils import cpp_extension

        try:
            build_dir = cpp_extension._get_build_directory(name, verbose=False)
            if not os.path.exists(os.path.join(build_dir, f"{name}.so")):
                print(f"gyre: compiling fused kernels for {what} (once; cached in {build_dir})",
                      file=sys.stderr, flush=True)
            # two translation units for a big module: ninja compiles them on two cores
            parts = 2 if len(programs) > 4 else 1
            sources = []
            os.makedirs(build_dir, exist_ok=True)
            with _build_lock(build_dir):
                for part in range(parts):
                    path = os.path.join(build_dir, f"{name}_{part}.cpp")
                    src = module_source(name, programs, part, parts)
                    if not os.path.exists(path) or _read(path) != src:
                        with open(path + ".tmp", "w", encoding="utf-8") as f:
                            f.write(src)
                        os.replace(path + ".tmp", path)
                    sources.append(path)
                compile_ = lambda: cpp_extension.load(  # noqa: E731
                    name, sources, extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(CSRC)], build_directory=build_dir,
                    is_python_module=False, verbose=False)
                so = os.path.join(build_dir, f"{name}.so")
                try:
                    compile_()
                except OSError:
                    if not os.path.exists(so):
                        raise
                    # a library that exists and does not load was cut short (a build killed
                    # while linking): ninja sees it as up to date, so its outputs go first, and
                    # torch, which builds a module once per process, forgets this one
                    _remove_outputs(build_dir)
                    versions = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
                    getattr(versions, "entries", {}).pop(name, None)
                    compile_()
        except Exception as e:  # no compiler, no ninja, a compile error: fall back
            raise BuildError(f"{type(e).__name__}: {str(e)[-2000:]}") from e
        _loaded[name] = name
        return name


def python_module(name: str):
    """The Python side of a loaded module (its streaming entry: ``make``, ``run``, ``layer``),
    imported from the same shared object that :func:`load` built."""
    with _lock:
        if name not in _python:
            from torch.utils import cpp_extension

            path = os.path.join(cpp_extension._get_build_directory(name, verbose=False),
                                f"{name}.so")
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise BuildError(f"cannot import {path}")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            _python[name] = mod
        return _python[name]


def toolchain_missing() -> str | None:
    """Why no build can happen here, checked without compiling (None when it may)."""
    from shutil import which

    try:
        from torch.utils import cpp_extension

        cpp_extension.verify_ninja_availability()
    except Exception:
        return "ninja is not installed"
    cxx = os.environ.get("CXX", "c++")
    if which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH"
    return None
