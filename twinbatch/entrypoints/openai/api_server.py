"""`twinbatch serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn), vLLM's endpoints and flags.

Every error reaches the client as an OpenAI error body {"error": {"message", "type", "param", "code"}}: bad input
is 400 (FastAPI's 422 included), an unknown model 404, a body over the size limit 413, a full queue 503, a failed
engine or request 500, with no traceback or file path (the log has those). Bodies are parsed and prompts
tokenized off the event loop. When the engine dies, in-flight requests fail, its gauges read zero, and the server
exits non-zero so that a supervisor restarts it (as vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.engine.async_llm import AsyncLLM
from twinbatch.entrypoints.openai import tokenization
from twinbatch.entrypoints.openai.metrics import ServerMetrics
from twinbatch.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
    now,
)
from twinbatch.entrypoints.openai.request_body import parse_request, validation_error
from twinbatch.entrypoints.openai.serving_chat import OpenAIServingChat
from twinbatch.entrypoints.openai.serving_completion import OpenAIServingCompletion
from twinbatch.models.presets import BUILTIN_MODEL
from twinbatch.outputs import error_line
from twinbatch.version import __version__

logger = logging.getLogger(__name__)
ENGINE_DEATH_EXIT_DELAY_S = 2.0  # failed requests' responses go out, and a scrape can see the zeroed gauges


@dataclass(frozen=True)
class ServerOptions:
    model_names: list[str]
    max_request_body_bytes: int
    allowed_origins: list[str]
    allowed_methods: list[str]
    allowed_headers: list[str]
    allow_credentials: bool = False


def build_app(engine: AsyncLLM, options: ServerOptions, on_engine_death: Callable[[], None]) -> FastAPI:
    """The app; it starts the engine thread when uvicorn starts it, and stops the engine when uvicorn stops.
    `on_engine_death` is called once the engine has died and its requests have been failed."""
    disable_created_metrics()  # as vLLM: no *_created series
    names = options.model_names
    metrics = ServerMetrics(names[0], engine.config, lambda: engine.stats)
    completion = OpenAIServingCompletion(engine, names, metrics)
    chat = OpenAIServingChat(engine, names, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        watcher = asyncio.create_task(_watch_engine(engine, on_engine_death))
        gc.collect()  # start-up's objects (torch's among them) out of the full sweeps, which stall every stream
        gc.freeze()
        try:
            yield
        finally:
            watcher.cancel()
            engine.shutdown()

    app = FastAPI(title="twinbatch", version=__version__, lifespan=lifespan)
    app.add_middleware(
        CORSMiddleware, allow_origins=options.allowed_origins, allow_methods=options.allowed_methods,
        allow_headers=options.allowed_headers, allow_credentials=options.allow_credentials,
    )  # fmt: skip
    _add_error_handlers(app)

    async def body(request: Request, model: type) -> Any:
        return await parse_request(request, model, options.max_request_body_bytes)

    @app.get("/health")
    @app.get("/ping")
    @app.post("/ping")
    async def health() -> Response:
        return Response(status_code=503 if engine.error is not None else 200)

    @app.get("/version")
    async def server_version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/load")
    async def load() -> dict[str, int]:
        return {"server_load": engine.num_unfinished}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        root, max_len = engine.config.model_path or names[0], completion.max_model_len
        data = [{"id": m, "object": "model", "created": now(), "owned_by": "twinbatch", "root": root,
                 "max_model_len": max_len} for m in names]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _respond(request, completion.create_completion(await body(request, CompletionRequest)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _respond(request, chat.create_chat_completion(await body(request, ChatCompletionRequest)))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await body(request, TokenizeRequest)
        return await engine.on_tokenizer_thread(tokenization.tokenize, chat, req)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await body(request, DetokenizeRequest)
        return await engine.on_tokenizer_thread(tokenization.detokenize, chat, req)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokenization.tokenizer_info(chat)

    return app


async def _watch_engine(engine: AsyncLLM, on_engine_death: Callable[[], None]) -> None:
    while engine.error is None:
        await asyncio.sleep(0.1)
    logger.error("the engine has died (%s); the server stops", engine.error)
    await asyncio.sleep(ENGINE_DEATH_EXIT_DELAY_S)
    on_engine_death()


async def _respond(request: Request, result: Awaitable[dict | AsyncIterator[str]]) -> Response:
    """Streams server-sent events, or returns JSON; a client that leaves before a whole response is ready gets
    its requests aborted. A streaming response aborts them itself when it sees the disconnect (uvicorn reports a
    disconnect to every later receive(), so one that came while the stream was made is not lost)."""
    work = asyncio.ensure_future(result)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # unwinds the engine stream, which aborts the unfinished requests
            with suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return Response(status_code=499)  # nobody reads it
    body = work.result()  # an OpenAIError goes to its handler
    if isinstance(body, dict):
        return JSONResponse(body)
    return StreamingResponse(body, media_type="text/event-stream")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:  # an unknown path, a wrong method
        return _error(OpenAIError(str(e.detail), e.status_code, "NotFoundError" if e.status_code == 404 else
                                  "BadRequestError"))  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(validation_error(e.errors()))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error(OpenAIError(f"internal error ({type(e).__name__}); the server log has the details", 500,
                                  "InternalServerError"))  # fmt: skip


def server_options(args: argparse.Namespace, default_name: str) -> ServerOptions:
    if args.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got {args.max_request_body_bytes}")
    return ServerOptions(
        args.served_model_name or [default_name], args.max_request_body_bytes, args.allowed_origins,
        args.allowed_methods, args.allowed_headers, args.allow_credentials,
    )  # fmt: skip


def run_server(args: argparse.Namespace) -> None:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    if args.max_waiting_requests < 0:
        raise ValueError(f"--max-waiting-requests must be >= 0, got {args.max_waiting_requests}")
    options = server_options(args, args.model or BUILTIN_MODEL)
    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    if config.parallel.node_rank > 0:
        from twinbatch.engine.launcher import run_headless

        raise SystemExit(run_headless(config))  # serves node 0's front end until it stops
    sock = socket.create_server((args.host, args.port))  # before loading the model: a taken port fails at once
    engine = AsyncLLM(config, args.max_waiting_requests)
    app = build_app(engine, options, on_engine_death=lambda: setattr(server, "should_exit", True))
    http = uvicorn.Config(app, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5,
                          timeout_keep_alive=args.timeout_keep_alive)  # fmt: skip
    server = uvicorn.Server(http)
    server.run(sockets=[sock])
    if engine.error is not None:
        sys.exit(f"error: the engine died ({error_line(engine.error)}); the server has stopped")
