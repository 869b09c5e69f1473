"""The ``gyre`` command line.

    gyre train classify|forecast|regress [--data NAME|PATH] [--cell NAME] [--hidden N] [--layers N]
                                 [--bidirectional] [--epochs N] [--seed N] [--out DIR]
                                 [--config FILE.toml] [--resume] [--device auto|cpu|cuda] ...
    gyre eval DIR [--data NAME|PATH] [--threads N]
    gyre predict DIR [DATA_PATH | --data PATH] [--output FILE.csv] [--threads N]
    gyre explain DIR [--method ig|shap|lime|occlusion] [--samples N] [--data NAME|PATH]
    gyre export DIR [--format onnx] [--output FILE.onnx] [--opset N]
    gyre predict DIR DATA_PATH --runtime onnxruntime
    gyre serve DIR [--host 127.0.0.1] [--port N] [--max-batch N] [--max-wait-ms MS] ...
    gyre prune DIR [--sparsity 0,0.25,0.5,0.75,0.9] [--structured] [--epochs N]
    gyre quantize DIR [--threads N]
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


def _list_of_str(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _task_parser(task: str, module) -> argparse.ArgumentParser:
    from .tasks import base
    cls = module.Config
    p = argparse.ArgumentParser(prog=f"gyre train {task}",
                                description=base.plain((cls.__doc__ or "").strip().split("\n\n")[0]),
                                argument_default=argparse.SUPPRESS)
    docs = base.field_help(cls)
    p.add_argument("--config", metavar="FILE.toml", help="read fields from a TOML file")
    _add_threads(p)
    p.add_argument("--nproc", type=_threads, metavar="N", default=None,
                   help="train data parallel in N processes on this machine (starts torchrun's "
                        "launcher; each process gets --threads, default cores/N threads); for "
                        "several machines run torchrun yourself (README)")
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
        text = docs.get(f.name, "")
        if t is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           help=f"{text} (default: {str(default).lower()})")
        elif t == list[str]:
            p.add_argument(flag, dest=f.name, type=_list_of_str, metavar="A,B",
                           help=f"{text}; comma separated (default: {','.join(default) or 'none'})")
        else:
            p.add_argument(flag, dest=f.name, type=t, metavar=t.__name__.upper(),
                           help=f"{text} (default: {default!r})".replace("%", "%%"))
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


def _build_config(task: str, module, argv: list[str], launch: dict | None = None):
    from .tasks import base
    parser = _task_parser(task, module)
    ns = vars(parser.parse_args(argv))
    threads, nproc = ns.pop("threads", None), ns.pop("nproc", None)
    if launch is not None:
        launch.update(threads=threads, nproc=nproc)
    _set_threads(threads)
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


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--nproc":
            skip = i + 1 < len(argv)
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _launch(task: str, argv: list[str], nproc: int, threads: int | None) -> int:
    """``gyre train TASK --nproc N``: torchrun's launcher starts N processes of
    ``python -m gyre train TASK ...`` on this machine (``--standalone``: a local rendezvous on a
    free port), each with ``threads`` intra-op threads (default: the cores divided by N)."""
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    per = threads or max(1, (os.cpu_count() or 1) // nproc)
    os.environ["OMP_NUM_THREADS"] = str(per)
    print(f"gyre: data parallel, {nproc} processes on this machine, {per} thread(s) each",
          file=sys.stderr)
    rest = _without_nproc(argv)
    if threads is None:
        rest += ["--threads", str(per)]
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", "gyre",
                        "train", task, *rest]))
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r}: exit {f.exitcode}" for r, f in sorted(e.failures.items()))
        print(f"gyre: error: the distributed run failed ({failures}); see the processes' "
              "messages above", file=sys.stderr)
        return 1
    return 0


def _cmd_train(task: str, argv: list[str]) -> int:
    from .tasks import base
    from .train import distributed
    module = _tasks.get(task)
    launch: dict = {}
    config, resume = _build_config(task, module, argv, launch)
    if launch["nproc"] and launch["nproc"] > 1 and distributed.env_world_size() <= 1:
        n = launch["nproc"]
        if config.batch_size % n:  # refused here, once, instead of by every process
            raise ValueError(f"--batch-size: {config.batch_size} does not split evenly over "
                             f"--nproc {n} processes; the global batch must be a multiple of "
                             "the process count")
        return _launch(task, argv, n, launch["threads"])
    if distributed.init_from_env(config.device):
        try:
            metrics = module.train(config, resume=resume)
        finally:
            distributed.shutdown()
    else:
        metrics = module.train(config, resume=resume)
    if metrics.get("rank", 0):
        return 0
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
    if args.output:
        parent = Path(args.output).resolve().parent
        if not parent.is_dir():
            raise FileNotFoundError(f"--output: the directory {str(parent)!r} of "
                                    f"{args.output!r} does not exist; create it first")
        if Path(args.output).is_dir():
            raise ValueError(f"--output: {args.output!r} is a directory, expected a CSV file path")
    import inspect

    predict = _tasks.get(task).predict
    if args.data_path is not None and args.data is not None and args.data_path != args.data:
        raise ValueError(f"data_path: give the data once, positionally or with --data; got "
                         f"{args.data_path!r} and --data {args.data!r}")
    data = args.data_path if args.data_path is not None else args.data
    params = inspect.signature(predict).parameters
    if data is None and params["data_path"].default is inspect.Parameter.empty:
        raise ValueError(f"data_path: task {task!r} predicts for a file you give "
                         f"(gyre predict DIR DATA_PATH); got none")
    if args.runtime == "torch":
        rows = predict(args.dir, data)
    else:
        if "runtime" not in params:
            raise ValueError(f"runtime: task {task!r} predicts with torch only; got "
                             f"{args.runtime!r}")
        rows = predict(args.dir, data, runtime=args.runtime)
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


def _cmd_explain(args) -> int:
    from .explain import explain_run
    _set_threads(args.threads)
    summary = explain_run(args.dir, method=args.method, samples=args.samples, data=args.data)
    if "channel_share" in summary:
        share = ", ".join(f"{c} {v:.2f}" for c, v in list(summary["channel_share"].items())[:8])
        what = f"share per channel: {share}"
    else:
        what = "most attributed token: " + ", ".join(repr(t) for t in summary["top_tokens"][:8])
    print(f"{summary['method']} attributions of {summary['sequences']} sequences "
          f"({summary.get('explained', '')}); {what}")
    if "deletion" in summary:
        d = summary["deletion"]
        print("deletion curve (accuracy): " + "; ".join(
            f"{f:.0%} steps: top {t:.3f} random {r:.3f}"
            for f, t, r in zip(d["fractions"], d["top"], d["random"], strict=True)))
    print(f"wrote {Path(args.dir) / 'explain'}: {', '.join(summary['files'])}")
    return 0


def _load_run(out_dir: str):
    """``(task name, config, model, extra)`` of a run directory, through its task's load_run."""
    task = _task_of(out_dir)
    module = _tasks.get(task)
    if not hasattr(module, "load_run"):
        raise ValueError(f"task {task!r} has no load_run(out_dir); its runs cannot be exported")
    config, model, *rest = module.load_run(out_dir)  # lm: (.., tokenizer); sentiment: (.., extra)
    return task, config, model, rest[-1] if rest else {}


def _cmd_export(args) -> int:
    from . import export
    _set_threads(args.threads)
    _, _, model, _ = _load_run(args.dir)
    out = Path(args.output) if args.output else Path(args.dir) / "model.onnx"
    export.onnx(model, out, lengths=True, opset=args.opset)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_serve(args) -> int:
    from .serve import Streamer, StreamServer, serve
    _set_threads(args.threads)
    task, _, model, extra = _load_run(args.dir)
    io = getattr(_tasks.get(task), "stream_io", None)
    transform_in, transform_out = io(model, extra) if io else (None, None)
    streamer = Streamer(model, max_streams=args.max_streams, max_batch=args.max_batch,
                        idle_timeout=args.idle_timeout, input=transform_in, output=transform_out)
    server = StreamServer(streamer, max_wait=args.max_wait_ms / 1000, max_queue=args.max_queue)
    print(f"gyre serve: {args.dir} on http://{args.host}:{args.port} ({task}, "
          f"{streamer.input_size} features per step)", file=sys.stderr)
    serve(server, args.host, args.port)
    return 0


def _cmd_prune(args) -> int:
    from . import prune
    _set_threads(args.threads)
    task = _task_of(args.dir)
    rows = prune.prune_run(_tasks.get(task), args.dir, args.sparsity,
                           structured_units=args.structured, epochs=args.epochs, dest=args.out)
    skip = ("kind", "run")
    cols = [c for c in rows[0] if c not in skip]
    print("  ".join(c.rjust(15) for c in cols))
    for r in rows:
        print("  ".join((f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])).rjust(15)
                        for c in cols))
    kind = rows[0]["kind"]
    print(f"table, plot and pruned runs in {args.out or Path(args.dir) / 'prune'} "
          f"(prune-{kind}.md, prune-{kind}.png)", file=sys.stderr)
    return 0


def _cmd_quantize(args) -> int:
    from . import quantize
    _set_threads(args.threads)
    task = _task_of(args.dir)
    res = quantize.quantize_run(_tasks.get(task), args.dir, threads=args.threads)
    cols = list(next(iter(res["rows"].values())))
    print("".ljust(20) + "".join(c.rjust(14) for c in cols))
    for name, r in res["rows"].items():
        print(name.ljust(20) + "".join(f"{r[c]:.4f}".rjust(14) for c in cols))
    print(f"int8 vs fp32 in onnxruntime: {res['speedup_int8_vs_onnx_fp32']}x faster; files "
          f"{res['fp32_file_bytes']} -> {res['int8_file_bytes']} bytes; written to "
          f"{Path(args.dir) / 'quantize.json'}, model.int8.onnx")
    return 0


def _sparsities(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected numbers in [0, 1), comma "
                                         "separated") from None
    if not vals or any(not 0 <= v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected numbers in [0, 1)")
    return vals


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
          "--data PATH.csv|.npz (formats: gyre.data.classification / gyre.data.forecasting); "
          "text (gyre.data.text): sentiment PATH.csv (--text-column, --label-column), "
          "lm PATH.txt, translate PATH.tsv (source<TAB>target lines)")
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
        raise ValueError("bench: gyre.bench has no main(argv) entry point")
    rc = entry(argv)
    return int(rc or 0)


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gyre", description="Recurrent networks on PyTorch: train, evaluate, "
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
    pr.add_argument("data_path", nargs="?", default=None,
                    help="CSV or NPZ file (forecast: default the run's own data)")
    pr.add_argument("--data", default=None, metavar="PATH",
                    help="the same as DATA_PATH (forecast: overrides the run's own data)")
    pr.add_argument("--output", "-o", default=None, help="CSV file to write (default: stdout)")
    pr.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                    help="run the model in torch (default) or its exported model.onnx in "
                         "onnxruntime (write it with gyre export)")
    _add_threads(pr)
    x = sub.add_parser("explain", help="attributions, state and gate maps of a trained run "
                       "(needs gyre[explain])")
    x.add_argument("dir", help="run directory written by gyre train (classify or forecast)")
    x.add_argument("--method", default="ig", help="ig (Integrated Gradients), shap (Kernel "
                   "SHAP), lime or occlusion (default: ig)")
    x.add_argument("--samples", type=_threads, default=8, metavar="N",
                   help="explain the first N test sequences (default: 8)")
    x.add_argument("--data", default=None, help="dataset name or file (default: the run's)")
    _add_threads(x)
    ex = sub.add_parser("export", help="export a trained run (model and head) to ONNX")
    ex.add_argument("dir", help="run directory written by gyre train")
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="(default: onnx)")
    ex.add_argument("--output", "-o", default=None, help="file to write (default: DIR/model.onnx)")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 to 20 (default: 17)")
    _add_threads(ex)
    sv = sub.add_parser("serve", help="serve a trained run to many concurrent streams (HTTP)")
    sv.add_argument("dir", help="run directory written by gyre train")
    sv.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8080, help="(default: 8080)")
    sv.add_argument("--max-batch", type=int, default=1024,
                    help="most streams stepped in one batched call (default: 1024)")
    sv.add_argument("--max-wait-ms", type=float, default=2.0,
                    help="how long a batch waits for more streams' steps (default: 2 ms)")
    sv.add_argument("--max-streams", type=int, default=4096, help="open streams at most")
    sv.add_argument("--max-queue", type=int, default=65536,
                    help="steps queued at most; a request beyond gets 503 (default: 65536)")
    sv.add_argument("--idle-timeout", type=float, default=300.0,
                    help="seconds without a step before a stream is evicted (default: 300)")
    _add_threads(sv)
    pn = sub.add_parser("prune", help="magnitude-prune a trained run, fine-tune, and tabulate")
    pn.add_argument("dir", help="run directory written by gyre train (classify, regress, "
                    "forecast, sentiment, lm)")
    pn.add_argument("--sparsity", type=_sparsities, default=[0.0, 0.25, 0.5, 0.75, 0.9],
                    help="one or more, comma separated (default: 0,0.25,0.5,0.75,0.9)")
    pn.add_argument("--structured", action="store_true",
                    help="remove whole hidden units (a smaller hidden size) instead of weights")
    pn.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (default: 3)")
    pn.add_argument("--out", default=None, help="where the pruned runs go (default: DIR/prune)")
    _add_threads(pn)
    qz = sub.add_parser("quantize", help="int8 (dynamic, per channel) of a run's ONNX export; "
                        "metric and speed before and after")
    qz.add_argument("dir", help="run directory written by gyre train (classify)")
    _add_threads(qz)
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
    commands = {"eval": _cmd_eval, "predict": _cmd_predict, "explain": _cmd_explain,
                "quantize": _cmd_quantize, "prune": _cmd_prune, "serve": _cmd_serve,
                "export": _cmd_export, "generate": _cmd_generate, "translate": _cmd_translate,
                "data": lambda _: _cmd_data_list()}
    if args.command in commands:
        return _run(parser, lambda: commands[args.command](args))
    parser.error(f"unknown command {args.command!r}")
    return 2


def _run(parser: argparse.ArgumentParser, fn) -> int:
    import os

    from .extras import MissingExtraError
    from .train import NonFiniteLossError
    try:
        return fn()
    except NonFiniteLossError as e:
        print(f"gyre: training stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, MissingExtraError) as e:
        if os.environ.get("GYRE_DEBUG"):
            raise
        print(f"gyre: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gyre: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
