"""Data parallelism with expert parallelism across processes (gloo on 127.0.0.1) against one process."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener
from pathlib import Path

import pytest
from helpers import DP_MAX_TOKENS, DP_PROMPTS, greedy, running, six_expert_checkpoint

from twinbatch import LLM
from twinbatch.engine.dp_client import HEARTBEAT_TIMEOUT_S
from twinbatch.engine.launcher import free_port
from twinbatch.engine.worker_main import connect, no_delay

TEXT = ["Hello", "The capital of France is", "abc"]
CLI_ARGS = ["--max-model-len", "128", "--data-parallel-size", "2", "--enable-expert-parallel", "--max-tokens", "8"]


@pytest.fixture(scope="module")
def reference(dsv2_dir: Path) -> dict[str, list[list[int]]]:
    llm = LLM(str(dsv2_dir), max_model_len=128)
    return {"batch": greedy(llm, DP_PROMPTS, DP_MAX_TOKENS), "single": greedy(llm, DP_PROMPTS[2:3], [12])}


@pytest.mark.parametrize("backend", ["allgather_reducescatter", "all2all", "all2allv"])
def test_dp2_ep2_matches_one_process(dsv2_dir: Path, reference: dict, backend: str) -> None:
    llm = LLM(str(dsv2_dir), max_model_len=128, data_parallel_size=2, enable_expert_parallel=True,
              all2all_backend=backend)  # fmt: skip
    try:
        assert all(nagle_off(conn) for conn in llm.llm_engine.conns.values())  # the front end's sockets
        assert greedy(llm, DP_PROMPTS, DP_MAX_TOKENS) == reference["batch"]
        if backend == "all2all":  # a caller away longer than the heartbeat timeout does not make a rank "silent"
            time.sleep(HEARTBEAT_TIMEOUT_S + 2)
        assert greedy(llm, DP_PROMPTS[2:3], [12]) == reference["single"]  # rank 1 has no request at all
    finally:
        llm.shutdown()


def nagle_off(conn: Connection) -> bool:
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_worker_connections_send_without_nagle_delay() -> None:
    with Listener(("127.0.0.1", 0), authkey=b"k") as listener:
        client = threading.Thread(target=lambda: connected.append(connect(listener.address, b"k")))
        connected: list[Connection] = []
        client.start()
        accepted = listener.accept()
        client.join()
    assert not nagle_off(accepted) and nagle_off(connected[0])  # the rank's end, as worker_main connects it
    assert nagle_off(no_delay(accepted))
    accepted.close()
    connected[0].close()


def test_dp3_matches_one_process(dsv2_dir: Path, tmp_path: Path) -> None:
    model = str(six_expert_checkpoint(dsv2_dir, tmp_path))
    expected = greedy(LLM(model, load_format="dummy", max_model_len=128), DP_PROMPTS, DP_MAX_TOKENS)
    llm = LLM(model, load_format="dummy", max_model_len=128, data_parallel_size=3, enable_expert_parallel=True,
              all2all_backend="all2all")  # fmt: skip
    try:
        assert greedy(llm, DP_PROMPTS, DP_MAX_TOKENS) == expected
    finally:
        llm.shutdown()


def test_experts_must_divide_over_ep_ranks(dsv2_dir: Path) -> None:
    with pytest.raises(ValueError, match="8 routed experts do not split evenly over 3"):
        LLM(str(dsv2_dir), data_parallel_size=3, enable_expert_parallel=True)


def cli_tokens(args: list[str], **kwargs: object) -> list[str]:
    out = subprocess.run(args, capture_output=True, text=True, timeout=180, check=True, **kwargs).stdout
    return re.findall(r"^Tokens: (.*)$", out, flags=re.M)


def twinbatch_cli(*args: str) -> list[str]:
    prompts = [a for p in TEXT for a in ("--prompt", p)]
    return [sys.executable, "-m", "twinbatch", "generate", *CLI_ARGS, "--ignore-eos", *args, *prompts]


def test_two_nodes_match_one_launch() -> None:
    """Two launcher invocations on one machine, as node 0 and node 1 of a two-node world."""
    port = str(free_port())
    nodes = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    node1 = subprocess.Popen(
        twinbatch_cli(*nodes, "--node-rank", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        two_nodes = cli_tokens(twinbatch_cli(*nodes, "--node-rank", "0"))
        assert node1.wait(timeout=60) == 0  # node 1 leaves when node 0's front end stops it
    finally:
        node1.kill()
    assert len(two_nodes) == 3 and two_nodes == cli_tokens(twinbatch_cli())


def test_nodes_launched_with_different_overlap_modes_stop_with_a_clear_error() -> None:
    """Ranks that would run different collectives (here SBO rounds on one node, none on the other) stop on their
    first step, before any layer runs, with an error that says what to change."""
    nodes = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             "--all2all-backend", "all2all"]  # fmt: skip
    node1 = subprocess.Popen(twinbatch_cli(*nodes, "--node-rank", "1", "--overlap", "off"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        start = time.monotonic()
        node0 = subprocess.run(twinbatch_cli(*nodes, "--node-rank", "0", "--overlap", "sbo"), capture_output=True,
                               text=True, timeout=180)  # fmt: skip
        node1.wait(timeout=60)  # node 1 leaves too (TimeoutExpired if it does not)
        assert time.monotonic() - start < 120
    finally:
        node1.kill()
    assert node0.returncode != 0
    assert "DP ranks would plan this step differently" in node0.stderr
    assert "launch all with the same --overlap" in node0.stderr and "(this one: sbo, 2, all2all" in node0.stderr


def test_torchrun_matches_one_launch() -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "twinbatch"]  # fmt: skip
    under_torchrun = cli_tokens(torchrun + twinbatch_cli()[3:])
    assert len(under_torchrun) == 3 and under_torchrun == cli_tokens(twinbatch_cli())


@pytest.mark.parametrize(
    "sig, error",
    [(signal.SIGKILL, r"DP rank 1 \(pid \d+\) exited with code -9"),
     (signal.SIGSTOP, r"DP rank 1 \(pid \d+\) sent no heartbeat for \d+ s: it is stopped or hung")],
    ids=["killed", "stopped"],
)  # fmt: skip
def test_lost_worker_stops_everything_with_a_clear_error(dsv2_dir: Path, sig: signal.Signals, error: str) -> None:
    llm = LLM(str(dsv2_dir), max_model_len=512, data_parallel_size=2, enable_expert_parallel=True)
    procs = llm.llm_engine.procs
    threading.Timer(1.0, os.kill, (procs[1].pid, sig)).start()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=error):
        greedy(llm, [[5, 6, 7]] * 4, [400] * 4)
    assert time.monotonic() - start < (30 if sig == signal.SIGKILL else 1 + HEARTBEAT_TIMEOUT_S + 4)
    assert all(not p.is_alive() for p in procs.values())  # no orphans, the stopped one included


FRONT_END = """
import os, sys
from twinbatch import LLM
llm = LLM(sys.argv[1], max_model_len=64, data_parallel_size=2, enable_expert_parallel=True)
print(*[p.pid for p in llm.llm_engine.procs.values()], flush=True)
os.kill(os.getpid(), 9)
"""


def test_workers_exit_when_the_front_end_dies(dsv2_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", FRONT_END, str(dsv2_dir)], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in proc.stdout.split()]
    assert proc.returncode == -9 and len(pids) == 2
    deadline = time.monotonic() + 30
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(running, pids))


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def test_ctrl_c_stops_every_process() -> None:
    cmd = twinbatch_cli("--max-tokens", "3000", "--max-model-len", "4096")
    front = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(children(front.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = children(front.pid)
        assert len(workers) >= 2  # the DP ranks (and multiprocessing's resource tracker, maybe)
        time.sleep(3)  # generating
        front.send_signal(signal.SIGINT)
        assert front.wait(timeout=30) == 130
        deadline = time.monotonic() + 10  # multiprocessing's resource tracker leaves once its pipe closes
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(running, workers))
    finally:
        front.kill()
