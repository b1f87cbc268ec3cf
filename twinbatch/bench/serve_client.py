"""The HTTP client of `twinbatch bench serve`: streaming completions over aiohttp, as vLLM's `vllm bench serve`.

One ClientSession with one connection pool serves every request, so a request costs the client the same at any
concurrency. A request whose connection fails before a status line arrives (typically a pooled keep-alive
connection that the server closed just as it was reused) is sent once more, on a new connection; once a status
line has arrived nothing is resent, since the server may have begun the work.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from twinbatch.bench.serve_metrics import RequestFuncOutput, parse_stream


class CompletionClient:
    """Sends requests to one server; use as `async with CompletionClient(...) as client`."""

    def __init__(self, base_url: str, max_concurrency: int | None, headers: dict[str, str]) -> None:
        self.base_url = base_url.rstrip("/")
        # no pool limit of its own below --max-concurrency: waiting for a connection would count as TTFT
        self._pooled = _session(aiohttp.TCPConnector(limit=max_concurrency or 0), headers)
        self._fresh = _session(aiohttp.TCPConnector(limit=0, force_close=True), headers)  # for retries only

    async def __aenter__(self) -> CompletionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pooled.close()
        await self._fresh.close()

    async def get_json(self, path: str) -> Any:
        """The JSON body of GET base_url + path; raises aiohttp.ClientError on a transport error or non-2xx."""
        async with self._pooled.get(self.base_url + path, raise_for_status=True) as response:
            return await response.json(content_type=None)

    async def get_text(self, path: str) -> str:
        """The body of GET base_url + path; raises aiohttp.ClientError on a transport error or non-2xx."""
        async with self._pooled.get(self.base_url + path, raise_for_status=True) as response:
            return await response.text()

    async def complete(self, endpoint: str, payload: dict[str, Any], prompt_len: int) -> RequestFuncOutput:
        """Streams one completion, timing each `data:` chunk; times count from the first attempt."""
        start = time.perf_counter()
        url = self.base_url + endpoint
        retries = 0
        try:
            try:
                response = await self._pooled.post(url, json=payload)
            except aiohttp.ClientConnectionError:  # raised before the status line and headers were read
                retries = 1
                response = await self._fresh.post(url, json=payload)
            async with response:
                out = await read_stream(response, start, prompt_len)
        except (aiohttp.ClientError, ValueError) as e:  # ValueError: bad JSON, or an SSE line over the buffer
            out = RequestFuncOutput(prompt_len=prompt_len, start_time=start, error=f"{type(e).__name__}: {e}")
        out.retries = retries
        return out


def _session(connector: aiohttp.TCPConnector, headers: dict[str, str]) -> aiohttp.ClientSession:
    # ClientTimeout() sets no limit: a long generation is not an error. trust_env=False: no proxy (it would be
    # measured too) and no .netrc, which aiohttp would look up in a worker thread for every request
    timeout = aiohttp.ClientTimeout()
    return aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout, trust_env=False)


async def read_stream(response: aiohttp.ClientResponse, start: float, prompt_len: int) -> RequestFuncOutput:
    """Reads a server-sent-event stream line by line and records each `data:` chunk with its arrival time."""
    if response.status != 200:
        body = (await response.read()).decode(errors="replace")
        return RequestFuncOutput(prompt_len=prompt_len, start_time=start, error=f"HTTP {response.status}: {body[:500]}")
    events: list[tuple[float, dict[str, Any]]] = []
    async for raw in response.content:
        line = raw.strip()
        data = line.removeprefix(b"data:").strip()
        if line.startswith(b"data:") and data != b"[DONE]":
            events.append((time.perf_counter(), json.loads(data)))
    return parse_stream(start, events, prompt_len)
