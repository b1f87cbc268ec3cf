"""`twinbatch serve` flags: the model (positional, as `vllm serve MODEL`, or --model), where to listen, the names
clients use, the waiting-queue bound, and every engine flag. Kept apart from the server so parsing imports no
web framework."""

from __future__ import annotations

import argparse

from twinbatch.engine.arg_utils import EngineArgs

DEFAULT_MAX_WAITING_REQUESTS = 1024
# Well above the idle expiry of common clients (httpx 5 s, aiohttp 15 s): the client, not the server, drops an
# idle connection, so a request sent on a connection the server is closing at that moment is never lost.
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 60


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, help="the model to serve, as in `vllm serve MODEL`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None, help="names clients use (default: the model)")
    parser.add_argument(
        "--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS,
        help="unfinished requests held beyond max_num_seqs x data_parallel_size; more are refused with HTTP 503 "
        f"(default: {DEFAULT_MAX_WAITING_REQUESTS})",
    )  # fmt: skip
    parser.add_argument(
        "--timeout-keep-alive", type=int, default=DEFAULT_TIMEOUT_KEEP_ALIVE_S,
        help=f"seconds an idle HTTP keep-alive connection stays open (default: {DEFAULT_TIMEOUT_KEEP_ALIVE_S})",
    )  # fmt: skip
    parser.add_argument("--uvicorn-log-level", default="info", choices=["debug", "info", "warning", "error"])
    EngineArgs.add_cli_args(parser)
