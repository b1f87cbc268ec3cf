"""A request body, from bytes to a checked pydantic model. Every way a body can be bad is a 400 with an OpenAI
error body (413 when it is too large), never a 500: bad UTF-8, invalid JSON, JSON nested too deeply for the
parser, a lone UTF-16 surrogate escape ("\\ud800", which no tokenizer can encode), or fields that fail validation.

Reading stays on the event loop (it awaits the socket); parsing runs on a worker thread, so a large body does not
stall the streams of other requests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from twinbatch.entrypoints.openai.protocol import FIELD_FORMS, OpenAIError

M = TypeVar("M", bound=BaseModel)


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        f"the request body is larger than {limit} bytes (--max-request-body-bytes)", 413, "RequestTooLargeError"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_request(request: Request, model: type[M], limit: int) -> M:
    raw = await read_body(request, limit)
    return await asyncio.to_thread(parse_body, raw, model)


def parse_body(raw: bytes, model: type[M]) -> M:
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as e:
        raise OpenAIError(f"the body is not valid UTF-8 ({e.reason} at byte {e.start}); send JSON in UTF-8") from None
    except json.JSONDecodeError as e:
        raise OpenAIError(f"the body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise OpenAIError("the body's JSON is nested too deeply") from None
    if b"\\ud" in raw or b"\\uD" in raw:  # only a \u escape can make a surrogate
        _check_surrogates(obj)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _check_surrogates(obj: Any) -> None:
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError as e:
                bad = value[e.start].encode("unicode_escape").decode()
                message = f"{path or 'body'} holds a lone surrogate ({bad}); send valid Unicode"
                raise OpenAIError(message, param=path or None) from None
        elif isinstance(value, dict):
            stack += [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
            stack += [(k, path) for k in value]
        elif isinstance(value, list):
            stack += [(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]


def validation_error(errors: Sequence[Any]) -> OpenAIError:
    """Pydantic's errors (and FastAPI's 422) become OpenAI's 400, naming the field, what it must be, and what was
    sent."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return OpenAIError(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    loc = [str(part) for part in first["loc"] if part != "body"]
    got = f" (got {_short(first['input'])})" if first["type"] != "missing" else ""
    form = next(((i, FIELD_FORMS[p]) for i, p in enumerate(loc) if p in FIELD_FORMS), None)
    if form is not None and got:  # a union: pydantic reports every member; say what the field accepts instead
        loc = loc[: form[0] + 1]
        return OpenAIError(f"{'.'.join(loc)} must be {form[1]}{got}", param=".".join(loc))
    param = ".".join(loc) or None
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return OpenAIError(f"{param or 'body'}: {first['msg']}{got}{more}", param=param)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(text)} characters)"
