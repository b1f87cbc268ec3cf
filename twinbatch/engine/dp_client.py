"""The front end of a data-parallel world: validates and tokenizes requests, sends each to the least-loaded DP
rank, and collects outputs. It owns no model. A rank that dies, fails, or falls silent (no heartbeat for
HEARTBEAT_TIMEOUT_S: stopped, or wedged) ends every rank, with an error that names it."""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection, Listener, wait
from multiprocessing.process import BaseProcess

from twinbatch.config import EngineConfig
from twinbatch.core.step_plan import overlap_counts
from twinbatch.distributed.parallel_state import TIMEOUT_S
from twinbatch.engine.input_processor import InputProcessor, Prompt
from twinbatch.engine.launcher import AUTHKEY, frontend_address, spawn_workers, with_free_ports
from twinbatch.engine.output_deltas import DeltaDecoder
from twinbatch.engine.output_processor import OutputProcessor
from twinbatch.engine.worker_main import no_delay
from twinbatch.outputs import RequestOutput
from twinbatch.sampling_params import SamplingParams
from twinbatch.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
STOP_GRACE_S = 10.0  # how long a rank may take to leave its loop when stopped
FAIL_GRACE_S = 1.0  # the same after a failure, when ranks may be stuck in a collective with the failed one
EXIT_GRACE_S = 5.0  # on a failure, how long to wait for a dying local rank to show its exit code
PEER_ERRORS_S = 1.0  # after a rank's error, how long to collect its peers' (they fail in collectives with it)
# Ranks send a heartbeat every 0.5 s (worker_main.HEARTBEAT_S); a rank silent this long is stopped or wedged.
HEARTBEAT_TIMEOUT_S = float(os.environ.get("TWINBATCH_HEARTBEAT_TIMEOUT_S", "5"))


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
        self.heard: dict[int, float] = {}  # when the front end last read a message from each rank
        self.deltas = DeltaDecoder()  # ranks send what each step added; outputs here are cumulative
        self.text = OutputProcessor(self.tokenizer)  # the ranks send token ids; the text is made here
        self._closed = False
        with Listener(frontend_address(config, listen=True), authkey=AUTHKEY) as listener:
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
        acceptor = threading.Thread(target=lambda: accepted.extend(no_delay(listener.accept()) for _ in range(size)))
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
            for conn in self._wait(list(pending), timeout=1.0):
                kind, rank, *rest = self._recv(conn)
                self.heard[rank] = time.monotonic()
                if kind == "error":
                    self._ranks_failed({rank: tuple(rest)}, " while starting")
                if kind == "ready":
                    self.conns[rank] = conn
                    pending.discard(conn)
            self._check_heartbeats()

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        request_id, text, token_ids = self.process_input.new_request(prompt, params, request_id, self.owner)
        rank = min(self.load, key=self.load.__getitem__)
        self._send(rank, ("add", request_id, {"prompt": text, "prompt_token_ids": token_ids}, params))
        self.text.add_request(request_id, params)
        self.owner[request_id] = rank
        self.load[rank] += 1
        return request_id

    def abort_request(self, request_id: str) -> None:
        rank = self.owner.pop(request_id, None)
        self.deltas.forget(request_id)
        self.text.forget(request_id)
        if rank is not None:
            self.load[rank] -= 1
            self._send(rank, ("abort", request_id))

    def get_stats(self) -> dict:
        """Per-rank engine statistics as last reported, and DBO and overlap step counts summed over ranks."""
        dbo: Counter[str] = Counter()
        for stats in self.rank_stats.values():
            dbo.update(stats["dbo"])
        per_rank = (stats["overlap"].items() for stats in self.rank_stats.values())
        overlap = overlap_counts(((mode, reason), n) for items in per_rank for mode, reasons in items
                                 for reason, n in reasons.items())  # fmt: skip
        return {"ranks": dict(sorted(self.rank_stats.items())), "dbo": dict(dbo), "overlap": overlap}

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
        """Returns the outputs that arrived within `timeout` seconds (maybe none). Reads every message waiting on
        a ready connection: heartbeats that piled up while nobody read never hold outputs back."""
        outputs: list[RequestOutput] = []
        for conn in self._wait(list(self.conns.values()), timeout):
            outputs += self._read(conn)
            while conn.poll(0):
                outputs += self._read(conn)
        self._check_heartbeats()
        return outputs

    def _read(self, conn: Connection) -> list[RequestOutput]:
        kind, payload, *rest = self._recv(conn)
        rank = self._rank_of(conn)
        self.heard[rank] = time.monotonic()
        if kind == "error":
            self._check_killed(EXIT_GRACE_S)  # a rank killed outright makes its peers fail: name it first
            self._ranks_failed({payload: tuple(rest)})
        if kind != "outputs":
            return []
        self.rank_stats[rank] = rest[0]
        outputs = []
        for delta in payload:
            if delta.request_id not in self.owner:
                continue  # ended here (a stop string, an abort) while the rank ran on: it stops when it hears
            out, stopped = self.text.process(self.deltas.decode(delta))
            if stopped:
                self.abort_request(out.request_id)
            elif out.finished:
                del self.owner[out.request_id]
                self.load[rank] -= 1
            outputs.append(out)
        return outputs

    def _check_heartbeats(self) -> None:
        """Fails naming a rank the front end has heard nothing from for HEARTBEAT_TIMEOUT_S. Time spent away
        from the connections (an offline caller between generate calls) does not count: every wait reads all
        that arrived, heartbeats included, before this runs."""
        now = time.monotonic()
        for rank, heard in self.heard.items():
            if now - heard > HEARTBEAT_TIMEOUT_S:
                pid = f" (pid {self.procs[rank].pid})" if rank in self.procs else ""
                self._fail(f"DP rank {rank}{pid} sent no heartbeat for {now - heard:.0f} s: it is stopped or hung")

    def _ranks_failed(self, errors: dict[int, tuple[str, str]], when: str = "") -> None:
        """Fails with every rank's error: the first to arrive may be a peer's failure in a collective with the
        rank at fault, so errors arriving within PEER_ERRORS_S are all named."""
        deadline = time.monotonic() + PEER_ERRORS_S
        others = [c for r, c in self.conns.items() if r not in errors]
        while others and (left := deadline - time.monotonic()) > 0:
            for conn in wait(others, left):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = ("gone",)
                if msg[0] in ("error", "gone"):
                    others.remove(conn)
                if msg[0] == "error":
                    errors[msg[1]] = msg[2:]
        for rank, (_, trace) in sorted(errors.items()):
            logger.error("DP rank %s failed%s:\n%s", rank, when, trace)
        self._fail("; ".join(f"DP rank {r} failed{when}: {summary}" for r, (summary, _) in sorted(errors.items())))

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
        self.shutdown(FAIL_GRACE_S)
        raise RuntimeError(message + "; every DP rank has been stopped")

    def shutdown(self, grace: float = STOP_GRACE_S) -> None:
        """Stops every rank (all of them leave their loop on the same step), then reaps this node's processes,
        killing those that have not exited within `grace` seconds (a stopped process included)."""
        if self._closed:
            return
        self._closed = True
        for rank in self.conns:
            self._send(rank, ("stop",))
        for outbox in self.outboxes.values():
            outbox.put(None)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns.values():
            conn.close()
