"""One DP rank's process: join the distributed world, build an engine, and step it in lockstep with the others.

Messages with the front end travel over a multiprocessing connection (pickled tuples):
  front end -> worker: ("add", request_id, prompt, params), ("abort", request_id), ("stop",)
  worker -> front end: ("ready", rank), ("outputs", [RequestOutput], stats) (deltas: engine/output_deltas.py),
                       ("error", rank, summary, traceback), ("alive", rank) every HEARTBEAT_S from a thread
  Stats (LLMEngine.get_stats) ride on outputs, and are sent once more when the rank falls idle. A request that
  fails alone (adding it raised, or processing its output did) comes back as a finished output with an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection

import torch

from twinbatch.config import EngineConfig
from twinbatch.distributed.parallel_state import TIMEOUT_S, destroy_distributed, init_distributed
from twinbatch.engine.llm_engine import LLMEngine
from twinbatch.engine.output_deltas import DeltaEncoder
from twinbatch.outputs import RequestError, RequestOutput, error_line

logger = logging.getLogger(__name__)
IDLE_POLL_S = 0.002  # how long an idle rank waits for new requests before the next (idle) sync
HEARTBEAT_S = 0.5  # how often a rank tells the front end it is alive, from a thread that no step blocks


class FrontendLink:
    """The rank's connection to the front end. Sends are serialized by a lock, so the heartbeat thread can send
    beside the main loop. The heartbeat stops only with the process: a stopped (SIGSTOP) or wedged process falls
    silent, one that is merely busy in a long step does not."""

    def __init__(self, conn: Connection, rank: int) -> None:
        self.conn, self.rank = conn, rank
        self._lock = threading.Lock()
        threading.Thread(target=self._beat, name="twinbatch-heartbeat", daemon=True).start()

    def send(self, msg: tuple) -> None:
        with self._lock:
            self.conn.send(msg)

    def _beat(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.send(("alive", self.rank))
                time.sleep(HEARTBEAT_S)


def no_delay(conn: Connection) -> Connection:
    """Turns Nagle's algorithm off on a connection's TCP socket. A Connection writes a message's length and its
    body separately; with Nagle on, the body of a message of some tens of KB waited for the peer's delayed ACK
    of the length, 40 ms on Linux (measured: 44 ms to send 100 one-token outputs and get a reply, 3.4 ms without)."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def connect(address: tuple[str, int], authkey: bytes) -> Connection:
    """Connects to the front end, retrying while it starts (it may be on another node)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return no_delay(Client(address, authkey=authkey))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def worker_device(config: EngineConfig, rank: int) -> torch.device:
    if config.device.type != "cuda":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.parallel.local_size))
        return config.device
    local = rank - config.parallel.local_ranks.start + int(os.environ.get("LOCAL_RANK", 0)) * config.parallel.local_size
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def run_worker(config: EngineConfig, rank: int, address: tuple[str, int], authkey: bytes) -> None:
    """Process entry point of DP rank `rank`."""
    logging.basicConfig(level=os.environ.get("TWINBATCH_LOG_LEVEL", "WARNING"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the front end, which stops every rank
    link = FrontendLink(connect(address, authkey), rank)
    try:
        config = dataclasses.replace(
            config,
            device=worker_device(config, rank),
            parallel=dataclasses.replace(config.parallel, data_parallel_rank=rank),
        )
        engine = LLMEngine(config, init_distributed(config.parallel, config.device), detokenize=False)
        # what start-up built (torch, compiled code, graphs) stays out of the collector's full sweeps: one took a
        # 0.43 s step on an H200 mid-serving. Only in this process: frozen cycles are never freed
        gc.collect()
        gc.freeze()
        link.send(("ready", rank))
        _loop(engine, link)
        engine.model_runner.shutdown()
    except BaseException as e:  # the front end must hear about every failure
        with contextlib.suppress(OSError):
            link.send(("error", rank, error_line(e), traceback.format_exc()))
        raise
    finally:
        destroy_distributed()


def _loop(engine: LLMEngine, link: FrontendLink) -> None:
    stop, sent_stats, deltas = False, None, DeltaEncoder()
    while not engine.stopped:
        idle, failed = not engine.has_unfinished_requests(), []
        while link.conn.poll(IDLE_POLL_S if idle and not stop else 0):
            stop |= _handle(engine, link.conn.recv(), failed, deltas)
            idle = False
        outputs = failed + engine.step(stop)
        stats = engine.get_stats()
        if outputs or (stats != sent_stats and not engine.has_unfinished_requests()):
            link.send(("outputs", [deltas.encode(o) for o in outputs], stats))
            sent_stats = stats


def _handle(engine: LLMEngine, msg: tuple, failed: list[RequestOutput], deltas: DeltaEncoder) -> bool:
    """Applies one front-end message; returns True for stop. A request that cannot be added fails alone."""
    if msg[0] == "add":
        _, request_id, prompt, params = msg
        try:
            engine.add_request(prompt, params, request_id)
        except Exception as e:
            logger.exception("request %s could not be added", request_id)
            error = RequestError(error_line(e), bad_input=isinstance(e, ValueError))
            failed.append(engine.failed_output(request_id, error))
    elif msg[0] == "abort":
        engine.abort_request(msg[1])
        deltas.forget(msg[1])
    return msg[0] == "stop"
