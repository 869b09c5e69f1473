"""Serving many concurrent streams: :class:`Streamer` (in process) and the HTTP server
(:class:`StreamServer`, ``gyre serve RUN``), both batching the pending steps of all streams into
one batched ``step`` call. Starts from a task's ``load_run`` or from ``nn/`` layers."""

from .server import StreamServer, serve
from .streamer import Streamer, StreamError

__all__ = ["Streamer", "StreamError", "StreamServer", "serve"]
