"""The front end of a data-parallel world: validates and tokenizes requests, sends each to the least-loaded DP
rank, and collects outputs. It owns no model. A rank that dies or fails ends every rank, with its error."""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection, Listener, wait
from multiprocessing.process import BaseProcess

from twinbatch.config import EngineConfig
from twinbatch.distributed.parallel_state import TIMEOUT_S
from twinbatch.engine.input_processor import InputProcessor, Prompt
from twinbatch.engine.launcher import AUTHKEY, frontend_address, spawn_workers, with_free_ports
from twinbatch.outputs import RequestOutput
from twinbatch.sampling_params import SamplingParams
from twinbatch.tokenizer import load_tokenizer

STOP_GRACE_S = 10.0
EXIT_GRACE_S = 5.0  # on a failure, how long to wait for a dying local rank to show its exit code


class DPEngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config = with_free_ports(config)
        self.tokenizer = load_tokenizer(config.tokenizer_path)
        self.process_input = InputProcessor(self.tokenizer, config.scheduler.max_model_len, config.model.vocab_size)
        self.conns: dict[int, Connection] = {}
        self.load = dict.fromkeys(range(config.parallel.data_parallel_size), 0)
        self.owner: dict[str, int] = {}
        self.rank_stats: dict[int, dict] = {}  # the latest LLMEngine.get_stats() of each rank
        self.outboxes: dict[int, queue.SimpleQueue] = {}  # messages to each rank, sent by its own thread
        self._closed = False
        with Listener(frontend_address(config), authkey=AUTHKEY) as listener:
            self.procs = spawn_workers(config, listener.address)
            atexit.register(self.shutdown)
            try:
                self._connect(listener)
            except RuntimeError as e:
                hint = "a script that creates an LLM at import time must guard it with `if __name__ == '__main__':`"
                raise RuntimeError(f"{e}\n(DP ranks are spawned processes: {hint})") from None

    def _connect(self, listener: Listener) -> None:
        """Accepts every rank's connection, then waits until each has built its engine."""
        accepted: list[Connection] = []
        size = self.config.parallel.data_parallel_size
        acceptor = threading.Thread(target=lambda: accepted.extend(listener.accept() for _ in range(size)))
        acceptor.daemon = True
        acceptor.start()
        deadline = time.monotonic() + TIMEOUT_S
        while acceptor.is_alive() and time.monotonic() < deadline:
            acceptor.join(0.1)
            self._check_processes()
        if len(accepted) < size:
            self._fail(f"only {len(accepted)} of {size} DP ranks connected within {TIMEOUT_S:.0f} s")
        pending = set(accepted)
        while pending:
            for conn in self._wait(list(pending), timeout=None):
                kind, rank, *rest = self._recv(conn)
                if kind == "error":
                    self._fail(f"DP rank {rank} failed while starting:\n{rest[0]}")
                self.conns[rank] = conn
                pending.discard(conn)

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        request_id, text, token_ids = self.process_input.new_request(prompt, params, request_id, self.owner)
        rank = min(self.load, key=self.load.__getitem__)
        self._send(rank, ("add", request_id, {"prompt": text, "prompt_token_ids": token_ids}, params))
        self.owner[request_id] = rank
        self.load[rank] += 1
        return request_id

    def abort_request(self, request_id: str) -> None:
        rank = self.owner.pop(request_id, None)
        if rank is not None:
            self.load[rank] -= 1
            self._send(rank, ("abort", request_id))

    def get_stats(self) -> dict:
        """Per-rank engine statistics as last reported, and DBO step counts summed over ranks."""
        dbo: Counter[str] = Counter()
        for stats in self.rank_stats.values():
            dbo.update(stats["dbo"])
        return {"ranks": dict(sorted(self.rank_stats.items())), "dbo": dict(dbo)}

    def _send(self, rank: int, msg: tuple) -> None:
        """Queues a message for the rank's sender thread. Sending never blocks the front end: a burst of
        requests cannot fill the pipe while the rank, itself blocked sending outputs, waits to be read."""
        if rank not in self.outboxes:
            self.outboxes[rank] = queue.SimpleQueue()
            threading.Thread(target=self._sender, args=(self.conns[rank], self.outboxes[rank]), daemon=True).start()
        self.outboxes[rank].put(msg)

    @staticmethod
    def _sender(conn: Connection, outbox: queue.SimpleQueue) -> None:
        while (msg := outbox.get()) is not None:
            try:
                conn.send(msg)
            except OSError:
                return  # the rank is gone; the receiving side reports it

    def has_unfinished_requests(self) -> bool:
        return bool(self.owner)

    def step(self, timeout: float = 1.0) -> list[RequestOutput]:
        """Returns the outputs that arrived within `timeout` seconds (maybe none)."""
        outputs: list[RequestOutput] = []
        for conn in self._wait(list(self.conns.values()), timeout):
            kind, payload, *rest = self._recv(conn)
            if kind == "error":
                self._check_killed(EXIT_GRACE_S)  # a rank killed outright makes its peers fail: name it first
                self._fail(f"DP rank {payload} failed:\n{rest[0]}")
            rank = self._rank_of(conn)
            self.rank_stats[rank] = rest[0]
            for out in payload:
                if out.finished and self.owner.pop(out.request_id, None) is not None:
                    self.load[rank] -= 1
            outputs += payload
        return outputs

    def _rank_of(self, conn: Connection) -> int | str:
        return next((r for r, c in self.conns.items() if c is conn), "?")

    def _wait(self, conns: list[Connection], timeout: float | None) -> list[Connection]:
        """Waits for messages; a local rank's process exiting counts as a failure."""
        sentinels = {p.sentinel: r for r, p in self.procs.items()}
        ready = wait([*conns, *sentinels], timeout)
        readable = [c for c in ready if not isinstance(c, int)]
        if not readable and any(isinstance(c, int) for c in ready):
            self._check_processes()
        return readable

    def _recv(self, conn: Connection) -> tuple:
        try:
            return conn.recv()
        except (EOFError, OSError):
            self._check_processes(grace=EXIT_GRACE_S)  # a local rank's socket closes just before its exit shows
            self._fail(f"lost the connection to DP rank {self._rank_of(conn)}")

    def _check_processes(self, grace: float = 0.0) -> None:
        """Fails if a local rank has exited, waiting up to `grace` seconds for one to."""
        for rank, p in self._ended(grace).items():
            self._fail(f"DP rank {rank} (pid {p.pid}) exited with code {p.exitcode}")

    def _check_killed(self, grace: float) -> None:
        """Fails naming a local rank that was killed by a signal (it could not report an error itself)."""
        for rank, p in self._ended(grace).items():
            if p.exitcode < 0:
                self._fail(f"DP rank {rank} (pid {p.pid}) exited with code {p.exitcode}")

    def _ended(self, grace: float) -> dict[int, BaseProcess]:
        ended = wait([p.sentinel for p in self.procs.values()], grace)
        for p in self.procs.values():
            if p.sentinel in ended:
                p.join()  # the sentinel fires as the process closes its files, a moment before it can be reaped
        return {r: p for r, p in self.procs.items() if p.exitcode is not None}

    def _fail(self, message: str) -> None:
        self.shutdown()
        raise RuntimeError(message + "; every DP rank has been stopped")

    def shutdown(self) -> None:
        """Stops every rank (all of them leave their loop on the same step), then reaps this node's processes."""
        if self._closed:
            return
        self._closed = True
        for rank in self.conns:
            self._send(rank, ("stop",))
        for outbox in self.outboxes.values():
            outbox.put(None)
        for p in self.procs.values():
            p.join(STOP_GRACE_S)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns.values():
            conn.close()
