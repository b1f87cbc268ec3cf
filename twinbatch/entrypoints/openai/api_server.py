"""`twinbatch serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn), vLLM's endpoints and flags.

Every error reaches the client as an OpenAI error body {"error": {"message", "type", "param", "code"}}: bad input
is 400 (FastAPI's 422 included), a full queue 503, a failed engine 500 (and /health turns 503).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.engine.async_llm import AsyncLLM
from twinbatch.entrypoints.openai import tokenization
from twinbatch.entrypoints.openai.metrics import ServerMetrics
from twinbatch.entrypoints.openai.protocol import (
    FIELD_FORMS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
    now,
)
from twinbatch.entrypoints.openai.serving_chat import OpenAIServingChat
from twinbatch.entrypoints.openai.serving_completion import OpenAIServingCompletion
from twinbatch.models.presets import BUILTIN_MODEL

logger = logging.getLogger(__name__)


def build_app(engine: AsyncLLM, model_names: list[str]) -> FastAPI:
    """The app; it starts the engine thread when uvicorn starts it, and stops the engine when uvicorn stops."""
    disable_created_metrics()  # as vLLM: no *_created series
    metrics = ServerMetrics(model_names[0], lambda: engine.stats)
    completion = OpenAIServingCompletion(engine, model_names, metrics)
    chat = OpenAIServingChat(engine, model_names, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="twinbatch", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if engine.error is not None else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        root, max_len = engine.config.model_path or model_names[0], completion.max_model_len
        data = [{"id": m, "object": "model", "created": now(), "owned_by": "twinbatch", "root": root,
                 "max_model_len": max_len} for m in model_names]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(request, completion.create_completion(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(request, chat.create_chat_completion(body))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return tokenization.tokenize(chat, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return tokenization.detokenize(chat, body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokenization.tokenizer_info(chat)

    return app


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

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(_validation_error(e.errors()))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error(OpenAIError(f"internal error: {e}", 500, "InternalServerError"))


def _validation_error(errors: Sequence[Any]) -> OpenAIError:
    """FastAPI's 422 becomes OpenAI's 400, naming the field, what it must be, and what was sent."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return OpenAIError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    loc = [str(part) for part in first["loc"] if part != "body"]
    got = f" (got {first['input']!r})" if first["type"] != "missing" else ""
    form = next(((i, FIELD_FORMS[p]) for i, p in enumerate(loc) if p in FIELD_FORMS), None)
    if form is not None and got:  # a union: pydantic reports every member; say what the field accepts instead
        loc = loc[: form[0] + 1]
        return OpenAIError(f"{'.'.join(loc)} must be {form[1]}{got}", param=".".join(loc))
    param = ".".join(loc) or None
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return OpenAIError(f"{param or 'body'}: {first['msg']}{got}{more}", param=param)


def run_server(args: argparse.Namespace) -> None:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    if args.max_waiting_requests < 0:
        raise ValueError(f"--max-waiting-requests must be >= 0, got {args.max_waiting_requests}")
    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    if config.parallel.node_rank > 0:
        from twinbatch.engine.launcher import run_headless

        raise SystemExit(run_headless(config))  # serves node 0's front end until it stops
    sock = socket.create_server((args.host, args.port))  # before loading the model: a taken port fails at once
    engine = AsyncLLM(config, args.max_waiting_requests)
    app = build_app(engine, args.served_model_name or [engine_args.model or BUILTIN_MODEL])
    http = uvicorn.Config(app, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5,
                          timeout_keep_alive=args.timeout_keep_alive)  # fmt: skip
    server = uvicorn.Server(http)
    server.run(sockets=[sock])
