"""The ``gyre`` command line.

    gyre train classify|forecast [--data NAME|PATH] [--cell NAME] [--hidden N] [--layers N]
                                 [--bidirectional] [--epochs N] [--seed N] [--out DIR]
                                 [--config FILE.toml] [--resume] [--device auto|cpu|cuda] ...
    gyre eval DIR [--data NAME|PATH] [--threads N]
    gyre predict DIR DATA_PATH [--output FILE.csv] [--threads N]
    gyre generate DIR [--prompt TEXT] [--length N] [--temperature T] [--top-k K] [--top-p P]
                      [--seed S]
    gyre translate DIR "text" [--beam K]
    gyre data list
    gyre bench ...

Every field of a task's ``Config`` is a flag (``--field-name``; booleans also ``--no-...``;
lists comma separated). Precedence: the task's defaults, then ``--config`` (or, with
``--resume``, the run's own ``config.toml``), then the flags given.

``--threads N`` (train, eval, predict) sets torch's intra-op threads for this process (default:
torch's, one per core). It is not part of the run's config. Small recurrent models on a machine
whose other cores are busy run far faster with ``--threads 1``: a thread that waits for a busy
core stalls every small matrix product.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path

from . import tasks as _tasks


class _Parser(argparse.ArgumentParser):
    pass


def _list_of_str(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _task_parser(task: str, module) -> argparse.ArgumentParser:
    cls = module.Config
    p = _Parser(prog=f"gyre train {task}", description=(cls.__doc__ or "").split("\n")[0],
                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE.toml", help="read fields from a TOML file")
    _add_threads(p)
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out from its checkpoint (its config.toml is the "
                        "base; flags given here override it; a new --epochs extends or shortens "
                        "the run, and a learning-rate schedule set by the epochs is re-planned "
                        "for the new length from where the run stopped)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if t is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           help=f"(default: {str(default).lower()})")
        elif t == list[str]:
            p.add_argument(flag, dest=f.name, type=_list_of_str, metavar="A,B",
                           help=f"comma separated (default: {','.join(default) or 'none'})")
        else:
            p.add_argument(flag, dest=f.name, type=t, metavar=t.__name__.upper(),
                           help=f"(default: {default!r})")
    return p


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected an int >= 1")
    return n


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_threads, metavar="N", default=None,
                   help="torch intra-op threads for this process (default: torch's; not saved "
                        "with the run; 1 is much faster for small models on a busy machine)")


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch
        torch.set_num_threads(n)


def _build_config(task: str, module, argv: list[str]):
    from .tasks import base
    parser = _task_parser(task, module)
    ns = vars(parser.parse_args(argv))
    _set_threads(ns.pop("threads", None))
    config_file = ns.pop("config", None)
    resume = ns.pop("resume", False)
    if resume:
        if not ns.get("out"):
            parser.error("--resume needs --out DIR, the run to continue")
        run_config = Path(ns["out"]) / "config.toml"
        if not run_config.is_file():
            raise FileNotFoundError(f"resume: {str(run_config)!r} does not exist; --out must be "
                                    "a run directory written by gyre train")
        config_file = config_file or run_config
    if config_file:
        return base.load_config(module.Config, config_file, **ns), resume
    return base.config_from_dict(module.Config, ns, source="flags"), resume


def _cmd_train(task: str, argv: list[str]) -> int:
    from .tasks import base
    module = _tasks.get(task)
    config, resume = _build_config(task, module, argv)
    metrics = module.train(config, resume=resume)
    if metrics.get("interrupted"):
        print(f"gyre: interrupted; checkpoint saved in {metrics['out']}. Continue with: "
              f"gyre train {task} --out {metrics['out']} --resume", file=sys.stderr)
        return 130
    print()
    print(f"{task} on {metrics.get('data', config.data)}: test metrics beside the baselines")
    print(base.format_metrics(metrics))
    published = metrics.get("published")
    if published:
        print("published: " + ", ".join(f"{k} {v}" for k, v in published.items()))
    print(f"run directory: {metrics['out']}")
    return 0


def _task_of(out_dir: str) -> str:
    from .tasks import base
    task = base.task_of_run(out_dir)
    if task is None:
        raise ValueError(f"out_dir: cannot tell which task wrote {out_dir!r} (no '# gyre task:' "
                         "line in its config.toml)")
    return task


def _cmd_eval(args) -> int:
    _set_threads(args.threads)
    task = _task_of(args.dir)
    result = _tasks.get(task).evaluate(args.dir, data=args.data)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_predict(args) -> int:
    _set_threads(args.threads)
    task = _task_of(args.dir)
    rows = _tasks.get(task).predict(args.dir, args.data_path)
    out = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        if rows:
            w = csv.DictWriter(out, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    return 0


def _cmd_generate(args) -> int:
    _set_threads(args.threads)
    task = _task_of(args.dir)
    if task != "lm":
        raise ValueError(f"dir: {args.dir!r} is a {task} run; gyre generate needs a run of "
                         "gyre train lm")
    from .tasks import lm
    sys.stdout.write(args.prompt)
    lm.generate(args.dir, args.prompt, args.length, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=sys.stdout)
    sys.stdout.write("\n")
    return 0


def _cmd_translate(args) -> int:
    _set_threads(args.threads)
    task = _task_of(args.dir)
    if task != "translate":
        raise ValueError(f"dir: {args.dir!r} is a {task} run; gyre translate needs a run of "
                         "gyre train translate")
    from .tasks import translate
    for line in translate.translate(args.dir, args.text, beam=args.beam):
        print(line)
    return 0


def _cmd_data_list() -> int:
    from .data import catalog
    items = catalog()
    width = max(len(d.name) for d in items) + 2
    for task in dict.fromkeys(d.task for d in items):
        print(f"{task}:")
        for d in (d for d in items if d.task == task):
            state = "offline" if d.available else f"missing ({d.install})"
            print(f"  {d.name.ljust(width)}{state.ljust(9)}  {d.description}")
    missing = [d for d in items if not d.available]
    print(f"\n{len(items) - len(missing)} of {len(items)} available offline; files: "
          "--data PATH.csv|.npz (formats: gyre.data.classification / gyre.data.forecasting)")
    return 0


def _cmd_bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("gyre.bench")
    except ModuleNotFoundError as e:
        if e.name not in ("gyre.bench",):
            raise
        raise ValueError("bench: gyre.bench is not part of this install") from None
    entry = getattr(bench, "main", None)
    if entry is None:
        try:
            entry = importlib.import_module("gyre.bench.cli").main
        except ModuleNotFoundError:
            raise ValueError("bench: gyre.bench has no main(argv) entry point") from None
    rc = entry(argv)
    return int(rc or 0)


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gyre", description="Recurrent networks on PyTorch: train, evaluate, "
                "predict, benchmark.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train a task (gyre train TASK --help for its flags)",
                       add_help=False)
    t.add_argument("task", nargs="?", help=f"one of {', '.join(_tasks.names())}")
    t.add_argument("rest", nargs=argparse.REMAINDER)
    e = sub.add_parser("eval", help="evaluate a trained run on its test split or other data")
    e.add_argument("dir", help="run directory written by gyre train")
    e.add_argument("--data", default=None, help="dataset name or file (default: the run's)")
    _add_threads(e)
    pr = sub.add_parser("predict", help="predict for a CSV/NPZ file with a trained run")
    pr.add_argument("dir", help="run directory written by gyre train")
    pr.add_argument("data_path", help="CSV or NPZ file")
    pr.add_argument("--output", "-o", default=None, help="CSV file to write (default: stdout)")
    _add_threads(pr)
    g = sub.add_parser("generate", help="sample text from a trained lm, one token at a time")
    g.add_argument("dir", help="run directory written by gyre train lm")
    g.add_argument("--prompt", default="", help="text the model reads first (once)")
    g.add_argument("--length", type=int, default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set of probability >= P (1 = all)")
    g.add_argument("--seed", type=int, default=0, help="same seed, same text")
    _add_threads(g)
    tr = sub.add_parser("translate", help="translate text with a trained translate run")
    tr.add_argument("dir", help="run directory written by gyre train translate")
    tr.add_argument("text", nargs="+", help="one or more source sentences")
    tr.add_argument("--beam", type=int, default=0, help="beam width (default: the run's)")
    _add_threads(tr)
    d = sub.add_parser("data", help="datasets")
    d.add_argument("action", choices=["list"], help="list: what is available offline")
    b = sub.add_parser("bench", help="benchmark layers against torch.nn (gyre.bench)",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if argv[:1] == ["bench"]:  # everything after 'bench' belongs to gyre.bench
        return _run(parser, lambda: _cmd_bench(argv[1:]))
    if argv[:1] == ["train"]:
        rest = argv[1:]
        if not rest or rest[0] in ("-h", "--help"):
            print(f"usage: gyre train TASK [flags]\n\ntasks: {', '.join(_tasks.names())}\n"
                  "gyre train TASK --help lists the flags of TASK")
            return 0 if rest else 2
        if rest[0] not in _tasks.TASKS:
            parser.error(f"task: got {rest[0]!r}, expected one of {', '.join(_tasks.names())}")
        return _run(parser, lambda: _cmd_train(rest[0], rest[1:]))
    args = parser.parse_args(argv)
    if args.command == "eval":
        return _run(parser, lambda: _cmd_eval(args))
    if args.command == "predict":
        return _run(parser, lambda: _cmd_predict(args))
    if args.command == "generate":
        return _run(parser, lambda: _cmd_generate(args))
    if args.command == "translate":
        return _run(parser, lambda: _cmd_translate(args))
    if args.command == "data":
        return _run(parser, _cmd_data_list)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _run(parser: argparse.ArgumentParser, fn) -> int:
    import os

    from .train import NonFiniteLossError
    try:
        return fn()
    except NonFiniteLossError as e:
        print(f"gyre: training stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as e:
        if os.environ.get("GYRE_DEBUG"):
            raise
        print(f"gyre: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gyre: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
