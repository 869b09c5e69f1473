"""What every task shares: the common config, TOML in and out, run directories, plots, tables."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from ..train import TrainConfig
from ..train.trainer import _atomic_write_bytes

#: TOML/CLI field types a task config may use
FIELD_TYPES = (int, float, str, bool, list[str])


@dataclass
class TaskConfig:
    """Fields every task has. ``0`` switches off ``clip_norm``, ``clip_value``, ``tbptt`` and
    ``patience``; an empty ``out`` means ``runs/<task>-<data>-<timestamp>``.

    Attributes:
        data: a dataset name (``gyre data list``) or a file path in the task's format.
        out: the run directory.
        cell: the recurrent cell, any ``gyre.cells.names()`` entry.
        hidden: units per recurrent layer.
        layers: stacked recurrent layers.
        bidirectional: run every layer in both directions.
        dropout: dropout between stacked layers.
        epochs, batch_size, lr, weight_decay, optimizer, scheduler, clip_norm, clip_value,
        accumulate, tbptt, patience, device, bf16, seed, progress, tensorboard: as
        :class:`gyre.train.TrainConfig`.
        val_fraction: the share of the training split held out for validation (early stopping
            and best-epoch selection); 0 = none.
    """

    data: str = ""
    out: str = ""
    cell: str = "lstm"
    hidden: int = 64
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    scheduler: str = "none"
    clip_norm: float = 1.0
    clip_value: float = 0.0
    accumulate: int = 1
    tbptt: int = 0
    patience: int = 0
    val_fraction: float = 0.2
    device: str = "auto"
    bf16: bool = False
    seed: int = 0
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        from .. import cells
        if self.cell not in cells.names():
            raise ValueError(f"cell: got {self.cell!r}, expected one of {', '.join(cells.names())}")
        for name in ("hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected an int >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: got {self.dropout}, expected a number in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: got {self.val_fraction}, expected a number in [0, 1)")
        self.train_config()  # validates the training fields

    def train_config(self, **overrides) -> TrainConfig:
        """The :class:`TrainConfig` these fields describe (``overrides`` win); OneCycleLR,
        which sets the rate of every step, steps per optimizer step."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        if self.scheduler.lower() in ("onecycle", "onecyclelr"):
            kw["scheduler_interval"] = "step"
        kw.update(overrides)
        return TrainConfig(**kw)


_MARKUP = [(re.compile(r":(?:class|meth|func|data|mod|attr):`~?([^`]+)`"), r"\1"),
           (re.compile(r"``([^`]*)``"), r"\1"), (re.compile(r"\*\*([^*]+)\*\*"), r"\1")]


def plain(text: str) -> str:
    """``text`` without reStructuredText markup (roles, literals, bold), on one line."""
    for pat, rep in _MARKUP:
        text = pat.sub(rep, text)
    return " ".join(text.split())


def _attribute_docs(cls) -> dict[str, str]:
    """The entries of the ``Attributes:`` section of ``cls``'s own docstring, by field name
    (an entry ``a, b: text`` documents both; with as many ``;``-separated parts as names, each
    name gets its part)."""
    doc = cls.__dict__.get("__doc__") or ""
    lines = doc.expandtabs().split("\n")
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
    except StopIteration:
        return {}
    entries: list[list] = []
    indent = None
    carry = ""  # a list of names continued on the next line
    for ln in lines[start + 1:]:
        if carry:
            ln, carry = carry + " " + ln.strip(), ""
        elif re.fullmatch(r"\s*[a-z_][a-z0-9_]*(,\s*[a-z_][a-z0-9_]*)*,\s*", ln):
            carry = ln.rstrip()
            continue
        if not ln.strip():
            if entries:
                break
            continue
        ind = len(ln) - len(ln.lstrip())
        if indent is None:
            indent = ind
        if ind < indent:
            break
        m = re.match(r"([a-z_][a-z0-9_]*(?:,\s*[a-z_][a-z0-9_]*)*,?)\s*:\s+(.*)", ln.strip())
        if ind == indent and m:
            entries.append([[n.strip() for n in m.group(1).split(",") if n.strip()], m.group(2)])
        elif entries:
            entries[-1][1] += " " + ln.strip()
    out = {}
    for names, text in entries:
        parts = [t.strip() for t in text.rstrip(".").split(";")]
        for k, n in enumerate(names):
            out[n] = parts[k] if len(parts) == len(names) > 1 else text
    return out


def field_help(cls) -> dict[str, str]:
    """One line of help per field of the config class ``cls``, from the ``Attributes:``
    sections of its docstring and its bases' (the nearest wins; an entry that says "as
    TrainConfig" is taken from :class:`gyre.train.TrainConfig`'s): the documentation is the one
    source of both the API reference and ``gyre train TASK --help``. Markup removed, the first
    sentence kept."""
    train = _attribute_docs(TrainConfig)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_attribute_docs(klass))
    out = {}
    for f in dataclasses.fields(cls):
        text = docs.get(f.name) or train.get(f.name, "")
        if re.match(r"as\s+:class:`[^`]*TrainConfig`", text.strip()) and f.name in train:
            text = train[f.name]
        text = plain(text)
        m = re.match(r"(.+?\.)(\s+[A-Z]|$)", text)  # the first sentence
        out[f.name] = (m.group(1) if m else text).rstrip(".")
    return out


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def check_fields(config) -> None:
    """Each field's value has its declared type (ints accepted for floats)."""
    for f in dataclasses.fields(config):
        t = _field_type(type(config), f)
        v = getattr(config, f.name)
        if t not in FIELD_TYPES:
            raise TypeError(f"{type(config).__name__}.{f.name}: type {t} is not one of the "
                            "config field types int, float, str, bool, list[str]")
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
            setattr(config, f.name, v)
        ok = (isinstance(v, list) and all(isinstance(s, str) for s in v)) if t == list[str] \
            else (isinstance(v, t) and (t is bool or not isinstance(v, bool)))
        if not ok:
            raise TypeError(f"{f.name}: got {v!r} ({type(v).__name__}), expected "
                            f"{'a list of strings' if t == list[str] else t.__name__}")
        if t is float and not math.isfinite(v):
            raise ValueError(f"{f.name}: got {v!r}, expected a finite number")


def load_config(cls, path: str | os.PathLike, **overrides):
    """``cls`` from a TOML file (keys are field names, flat), then ``overrides`` on top."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config: {str(path)!r} is not valid TOML ({e})") from e
    return config_from_dict(cls, {**raw, **overrides}, source=str(path))


def config_from_dict(cls, values: dict, source: str = "config"):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; expected fields of "
                         f"{cls.__module__}.{cls.__name__}: {', '.join(sorted(known))}")
    return cls(**values)


def config_to_toml(config) -> str:
    import tomli_w
    return tomli_w.dumps(dataclasses.asdict(config))


def task_name(config) -> str | None:
    """The task whose module defines ``type(config)`` (a key of ``gyre.tasks.TASKS``)."""
    from . import TASKS
    return next((k for k, v in TASKS.items() if v == type(config).__module__), None)


def write_config(config, path: str | os.PathLike) -> None:
    """The config as TOML, headed by a ``# gyre task: NAME`` line that ``gyre eval`` reads."""
    task = task_name(config)
    head = f"# gyre task: {task}\n" if task else ""
    _atomic_write_bytes(Path(path), (head + config_to_toml(config)).encode())


def task_of_run(out_dir: str | os.PathLike) -> str | None:
    """The task named in ``out_dir/config.toml``'s first line, or None."""
    path = Path(out_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"out_dir: {str(path)!r} does not exist; expected a run "
                                "directory written by gyre train")
    first = path.read_text().split("\n", 1)[0]
    m = re.fullmatch(r"# gyre task: (\w+)\s*", first)
    return m.group(1) if m else None


#: the fields a resumed run may change (they take effect from the resumed step on); every other
#: field describes the model, its optimizer or its data, which the checkpoint fixes
RESUMABLE = ("out", "epochs", "lr", "patience", "progress", "tensorboard", "device")


def check_resume(config, out: str | os.PathLike, also: tuple[str, ...] = ()) -> None:
    """Refuse, before anything is written, a resumed ``config`` that changes a field outside
    :data:`RESUMABLE` (and a task's own ``also``: fields read only after training, such as an
    evaluation setting) from the run's own ``out/config.toml``: one error naming the flags."""
    resumable = RESUMABLE + tuple(also)
    if not str(out) or not config.out:
        raise ValueError("resume: needs out, the run directory to continue")
    out = Path(out)
    if not (out / "checkpoint").is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {str(out)!r} to resume from")
    saved = load_config(type(config), out / "config.toml")
    changed = [f.name for f in dataclasses.fields(config) if f.name not in resumable
               and getattr(config, f.name) != getattr(saved, f.name)]
    if changed:
        what = ", ".join(f"--{n.replace('_', '-')} {getattr(saved, n)!r} -> "
                         f"{getattr(config, n)!r}" for n in changed)
        can = ", ".join("--" + n.replace("_", "-") for n in resumable if n != "out")
        raise ValueError(f"resume: {what}: a resumed run cannot change its architecture, "
                         f"optimizer or data (its checkpoint holds them); it can change only "
                         f"{can}. Start a new run with another --out instead")


def config_writer(config, out: str | os.PathLike):
    """A Trainer callback that writes ``out/config.toml`` when the run starts (a resumed run:
    once its checkpoint was loaded and checked), so a refused resume leaves the run as it was."""
    path = Path(out) / "config.toml"

    def write(trainer, event, info):
        if event == "start" and is_main_process():
            write_config(config, path)

    return write


def epoch_clock(callback=None):
    """``(callback, times)``: a Trainer callback that calls ``callback`` and appends, at the end
    of every epoch (its validation included), ``{"epoch", "cpu_s", "wall_s"}`` to ``times``:
    this process's CPU time (``time.process_time``, the figure a shared machine distorts
    least) and the wall time since the previous epoch ended or training started."""
    import time
    times: list[dict] = []
    last = [0.0, 0.0]

    def f(trainer, event, info):
        if callback is not None:
            callback(trainer, event, info)
        if event == "start":
            last[:] = time.process_time(), time.perf_counter()
        elif event == "epoch":
            now = time.process_time(), time.perf_counter()
            times.append({"epoch": info["epoch"], "cpu_s": round(now[0] - last[0], 2),
                          "wall_s": round(now[1] - last[1], 2)})
            last[:] = now

    return f, times


def is_main_process() -> bool:
    """False on every process but rank 0 of a distributed run (only rank 0 writes files)."""
    from ..train import distributed
    return distributed.is_main()


def other_rank(out: Path) -> dict | None:
    """On a process other than rank 0 of a distributed run, after training: the result such a
    process returns (rank 0 alone evaluates, writes metrics and plots); None on rank 0."""
    from ..train import distributed
    ctx = distributed.context()
    return None if ctx.main else {"out": str(out), "rank": ctx.rank}


def early_exit(out: Path, result: dict) -> dict | None:
    """What a task's ``train`` returns instead of scoring after ``Trainer.fit``'s ``result``:
    on a distributed run's other processes (:func:`other_rank`), or for an interrupted run;
    None when this process goes on to score."""
    early = other_rank(out)
    if early is None and result["interrupted"]:
        early = {"interrupted": True, "out": str(out)}
    return early


def same_tokenizer(tok):
    """``tok`` as rank 0 fitted it, on every process of a distributed run (``tok`` itself
    otherwise): every process then feeds its model the same token ids."""
    from ..train import distributed
    if not distributed.context().active:
        return tok
    from ..text import tokenizer_from_state
    return tokenizer_from_state(distributed.broadcast(tok.state()))


def resolve_out(config, task: str) -> Path:
    """``config.out``, or ``runs/<task>-<data name>-<timestamp>`` (set on the config too)."""
    if not config.out:
        stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(config.data).stem or "data").strip("_")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        config.out = str(Path("runs") / f"{task}-{stem}-{stamp}")
    from ..train import distributed
    config.out = distributed.broadcast(config.out)  # every process: rank 0's time stamp
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} is a file, expected a run directory (or a new path)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(obj, path: str | os.PathLike) -> None:
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_history(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Loss curves (train and validation loss per epoch) as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    for key in ("train_loss", "val_loss"):
        vals = [r.get(key) for r in history]
        if any(v is not None for v in vals):
            ax.plot(epochs, vals, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_metrics(metrics: dict) -> str:
    """One table: the model's test metrics, then each baseline's, same columns."""
    rows = [(metrics.get("model", "model"), metrics.get("test", {}))]
    if (metrics.get("network") or {}).get("test"):  # a combined forecast's network alone
        rows.append(("network alone", metrics["network"]["test"]))
    if (metrics.get("dynamic") or {}).get("test"):  # a language model's dynamic evaluation
        rows.append((f"dynamic eval (lr {metrics['dynamic']['lr']:g})",
                     metrics["dynamic"]["test"]))
    rows += list(metrics.get("baselines", {}).items())
    cols = list(dict.fromkeys(k for _, r in rows for k in r))
    width = max(len(str(n)) for n, _ in rows) + 2
    lines = ["".ljust(width) + "".join(c.rjust(12) for c in cols)]
    for name, r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
                         .rjust(12))
        lines.append(str(name).ljust(width) + "".join(cells))
    return "\n".join(lines)


#: what ``predict(..., runtime=)`` can run a trained run's model on
RUNTIMES = ("torch", "onnxruntime")


def runtime_model(out_dir: str | os.PathLike, runtime: str):
    """The run's model under ``runtime``: None for ``"torch"`` (the task's own model), or the
    run's exported ``model.onnx`` (``gyre export``) as a :class:`gyre.export.OnnxModel`."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: got {runtime!r}, expected one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return None
    from ..export import OnnxModel
    path = Path(out_dir) / "model.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"runtime: {str(path)!r} does not exist; write it first with "
                                f"gyre export {out_dir} --format onnx")
    return OnnxModel(path)
