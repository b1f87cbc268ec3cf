"""`twinbatch serve` flags: the model (positional, as `vllm serve MODEL`, or --model), where to listen, the names
clients use, the waiting-queue bound, and every engine flag. Kept apart from the server so parsing imports no
web framework."""

from __future__ import annotations

import argparse
import json

from twinbatch.engine.arg_utils import EngineArgs

DEFAULT_MAX_WAITING_REQUESTS = 1024
# Well above the idle expiry of common clients (httpx 5 s, aiohttp 15 s): the client, not the server, drops an
# idle connection, so a request sent on a connection the server is closing at that moment is never lost.
DEFAULT_TIMEOUT_KEEP_ALIVE_S = 60
DEFAULT_MAX_REQUEST_BODY_BYTES = 32 << 20  # 32 MiB: a batch of long token-id prompts fits


def json_list(value: str) -> list[str]:
    """A CORS flag's value: a JSON list of strings, as vLLM takes it."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not (isinstance(parsed, list) and all(isinstance(v, str) for v in parsed)):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, e.g. '[\"*\"]', got {value!r}")
    return parsed


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
    parser.add_argument(
        "--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        help=f"larger request bodies are refused with HTTP 413 (default: {DEFAULT_MAX_REQUEST_BODY_BYTES})",
    )  # fmt: skip
    for name in ("origins", "methods", "headers"):
        parser.add_argument(f"--allowed-{name}", type=json_list, default=["*"],
                            help=f'CORS: allowed {name}, a JSON list (default: ["*"])')  # fmt: skip
    parser.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    parser.add_argument("--uvicorn-log-level", default="info", choices=["debug", "info", "warning", "error"])
    EngineArgs.add_cli_args(parser)
