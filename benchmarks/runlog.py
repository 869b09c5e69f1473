"""The run log the table scripts share: one JSON line per finished run in a ``.jsonl`` file (an
interrupted table resumes where it stopped), and a claim file per run so that two processes
side by side never make the same run."""

from __future__ import annotations

import json
from pathlib import Path


def done(jsonl: Path, key) -> set:
    """The keys (``key(record)``) of the runs already in ``jsonl``."""
    if not jsonl.is_file():
        return set()
    return {key(json.loads(line)) for line in jsonl.read_text().splitlines()}


def claim(jsonl: Path, tag: str) -> bool:
    """True if this process may make the run ``tag`` (the first to create its claim file)."""
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    try:
        (jsonl.parent / f".claim-{tag}").open("x").close()
    except FileExistsError:
        return False
    return True


def append(jsonl: Path, record: dict) -> None:
    with jsonl.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
