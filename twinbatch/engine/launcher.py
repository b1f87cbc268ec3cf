"""Starting DP rank processes: all of them on one node, or this node's share of a multi-node world.

Ranks meet through torch.distributed at master_addr:master_port (env:// rendezvous); they reach the front end,
which runs on node 0, at master_addr:master_port + 1.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import socket
from multiprocessing.process import BaseProcess

from twinbatch.config import EngineConfig
from twinbatch.engine.worker_main import run_worker

AUTHKEY = os.environ.get("TWINBATCH_AUTHKEY", "twinbatch").encode()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_free_ports(config: EngineConfig) -> EngineConfig:
    """A single node needs no agreed ports: pick free ones (two DP worlds on one machine never collide)."""
    p = config.parallel
    if p.nnodes > 1:
        return config
    return dataclasses.replace(config, parallel=dataclasses.replace(p, master_port=free_port(p.master_addr)))


def frontend_address(config: EngineConfig, listen: bool = False) -> tuple[str, int]:
    """Where ranks reach the front end. On one node the front end listens on any free port (`listen`), which
    it then hands to the ranks it spawns: master_port + 1 need not be free."""
    p = config.parallel
    return (p.master_addr, 0) if listen and p.nnodes == 1 else (p.master_addr, p.master_port + 1)


def spawn_workers(config: EngineConfig, address: tuple[str, int]) -> dict[int, BaseProcess]:
    """Starts this node's DP ranks; each connects to the front end at `address`."""
    ctx = mp.get_context("spawn")
    procs = {}
    for rank in config.parallel.local_ranks:
        procs[rank] = ctx.Process(
            target=run_worker, args=(config, rank, address, AUTHKEY), name=f"twinbatch-dp{rank}", daemon=True
        )
        procs[rank].start()
    return procs


def run_headless(config: EngineConfig) -> int:
    """A node other than 0: run its ranks until the front end stops them; returns their worst exit code."""
    procs = spawn_workers(config, frontend_address(config))
    try:
        for p in procs.values():
            p.join()
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
    return max(abs(p.exitcode or 0) for p in procs.values())
