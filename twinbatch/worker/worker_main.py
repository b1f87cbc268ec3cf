"""One DP rank's process: join the distributed world, build an engine, and step it in lockstep with the others.

Messages with the front end travel over a multiprocessing connection (pickled tuples):
  front end -> worker: ("add", request_id, prompt, params), ("abort", request_id), ("stop",)
  worker -> front end: ("ready", rank), ("outputs", [RequestOutput], stats), ("error", rank, text)
  Stats (LLMEngine.get_stats) ride on outputs, and are sent once more when the rank falls idle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
import traceback
from multiprocessing.connection import Client, Connection

import torch

from twinbatch.config import EngineConfig
from twinbatch.distributed.parallel_state import TIMEOUT_S, destroy_distributed, init_distributed
from twinbatch.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)
IDLE_POLL_S = 0.002  # how long an idle rank waits for new requests before the next (idle) sync


def connect(address: tuple[str, int], authkey: bytes) -> Connection:
    """Connects to the front end, retrying while it starts (it may be on another node)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return Client(address, authkey=authkey)
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
    conn = connect(address, authkey)
    try:
        config = dataclasses.replace(
            config,
            device=worker_device(config, rank),
            parallel=dataclasses.replace(config.parallel, data_parallel_rank=rank),
        )
        engine = LLMEngine(config, init_distributed(config.parallel, config.device))
        conn.send(("ready", rank))
        _loop(engine, conn)
        engine.model_runner.shutdown()
    except BaseException:  # the front end must hear about every failure
        with contextlib.suppress(OSError):
            conn.send(("error", rank, traceback.format_exc()))
        raise
    finally:
        destroy_distributed()


def _loop(engine: LLMEngine, conn: Connection) -> None:
    stop, sent_stats = False, None
    while not engine.stopped:
        idle = not engine.has_unfinished_requests()
        while conn.poll(IDLE_POLL_S if idle and not stop else 0):
            stop |= _handle(engine, conn.recv())
            idle = False
        outputs = engine.step(stop)
        stats = engine.get_stats()
        if outputs or (stats != sent_stats and not engine.has_unfinished_requests()):
            conn.send(("outputs", outputs, stats))
            sent_stats = stats


def _handle(engine: LLMEngine, msg: tuple) -> bool:
    """Applies one front-end message; returns True for stop."""
    if msg[0] == "add":
        _, request_id, prompt, params = msg
        engine.add_request(prompt, params, request_id)
    elif msg[0] == "abort":
        engine.abort_request(msg[1])
    return msg[0] == "stop"
