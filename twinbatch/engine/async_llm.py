"""The engine loop in one background thread, its outputs handed to asyncio: an HTTP server never waits on a step.

    HTTP handlers (event loop)                      engine thread
      AsyncLLM.generate --("add", requests)--> inbox --> engine.add_request
                                                          loop: engine.step()
      per-request asyncio.Queue <-- call_soon_threadsafe -- outputs of the step
      leaving early (client gone) --("abort", ids)--> inbox --> engine.abort_request (frees its KV blocks)

The engine runs in processes of its own for every DP size (a DPEngineClient; with DP=1 one worker process): this
process does HTTP, tokenization and the output streams, and shares its GIL with no model step. Only the engine
thread touches the engine client; the per-request queues are touched only on the event loop. A request that
fails alone (adding it raised, or processing its output did) ends with an output that carries its error. A
failing step fails every pending request and marks the engine dead (no new request is accepted; its gauges read
zero), never leaving a caller waiting.

The HTTP side's tokenizer work (tokenizing, chat templates) runs on one thread of its own, `tokenizer_thread`:
never on the event loop, whose streams a long prompt would stall, and never on two threads at once, which a
Hugging Face tokenizer does not allow.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from twinbatch.config import EngineConfig
from twinbatch.engine.dp_client import DPEngineClient
from twinbatch.engine.input_processor import InputProcessor
from twinbatch.outputs import RequestError, RequestOutput, error_line
from twinbatch.sampling_params import SamplingParams
from twinbatch.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
DP_POLL_S = 0.005  # how long a DP front-end step waits for outputs before looking at new requests again

EngineRequest = tuple[str, dict[str, Any], SamplingParams]  # (request id, {"prompt", "prompt_token_ids"}, params)
T = TypeVar("T")
GAUGES = ("num_running", "num_waiting", "kv_cache_usage")  # of get_stats(): zero once the engine is dead


class EngineDeadError(RuntimeError):
    """The engine loop failed; the server can no longer generate."""


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-waiting-requests allows."""


class AsyncLLM:
    def __init__(self, config: EngineConfig, max_waiting_requests: int) -> None:
        self.config = config
        dp = config.parallel.data_parallel_size
        self.engine = DPEngineClient(config)  # DP=1 too: the engine in its own process
        # The HTTP side tokenizes with its own tokenizer: a Hugging Face tokenizer must not be used by two threads.
        self.tokenizer = load_tokenizer(config.tokenizer_path)
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="twinbatch-tokenizer")
        self.process_input = InputProcessor(self.tokenizer, config.scheduler.max_model_len, config.model.vocab_size)
        # Requests beyond those that can run at once (max_num_seqs per DP rank) wait, up to max_waiting_requests.
        self.max_unfinished = config.scheduler.max_num_seqs * dp + max_waiting_requests
        self.stats: dict[int, dict] = {}  # per DP rank: its latest LLMEngine.get_stats()
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._update_stats()

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    async def on_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn(*args) on the tokenizer thread: for everything that uses `self.tokenizer`."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, fn, *args)

    def start(self) -> None:
        """Starts the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="twinbatch-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self.engine.shutdown()
        self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def check_admission(self, num_requests: int) -> None:
        """Raises EngineDeadError or QueueFullError if `num_requests` more requests cannot be taken now."""
        if self.error is not None:
            raise EngineDeadError(f"the engine has failed: {self.error}")
        if len(self._queues) + num_requests > self.max_unfinished:
            raise QueueFullError(
                f"the server has {len(self._queues)} unfinished requests and takes at most {self.max_unfinished} "
                "(max_num_seqs x data_parallel_size + --max-waiting-requests); retry later"
            )

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """Queues the requests (all or none) and yields their outputs as they arrive, until every one has
        finished. Leaving early (the client went away, an error) aborts the unfinished ones."""
        self.check_admission(len(requests))
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        unfinished = {request_id for request_id, _, _ in requests}
        for request_id in unfinished:
            self._queues[request_id] = outputs
        self._inbox.put(("add", requests))
        try:
            while unfinished:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    unfinished.discard(out.request_id)
                yield out
        finally:
            for request_id, _, _ in requests:
                self._queues.pop(request_id, None)
            if unfinished:
                self._inbox.put(("abort", list(unfinished)))

    # The engine thread.

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._take_requests()
                outputs = self.engine.step(timeout=DP_POLL_S)  # also reads stats that ranks send when idle
                self._update_stats()
                if outputs:
                    self._call(self._deliver, outputs)
        except BaseException as e:
            logger.exception("the engine loop failed")
            self.stats = {rank: stats | dict.fromkeys(GAUGES, 0) for rank, stats in self.stats.items()}
            self.error = e
            self._call(self._fail_all, EngineDeadError(f"the engine has failed: {error_line(e)}"))

    def _take_requests(self) -> None:
        """Applies queued adds and aborts."""
        try:
            msg = self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(msg)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._update_stats()  # an abort frees KV blocks even when no step follows

    def _apply(self, msg: tuple) -> None:
        if msg[0] == "add":
            for request_id, prompt, params in msg[1]:
                try:
                    self.engine.add_request(prompt, params, request_id)
                except Exception as e:  # checked on the HTTP side already; this is a last line of defence
                    logger.exception("request %s could not be added", request_id)
                    error = RequestError(error_line(e), bad_input=isinstance(e, ValueError))
                    self._call(self._deliver, [RequestOutput.failed(request_id, error)])
        elif msg[0] == "abort":
            for request_id in msg[1]:
                self.engine.abort_request(request_id)

    def _update_stats(self) -> None:
        stats = self.engine.get_stats()
        self.stats = stats["ranks"]

    def _call(self, fn: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # On the event loop.

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if (q := self._queues.get(out.request_id)) is not None:
                q.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        for q in set(self._queues.values()):
            q.put_nowait(error)
