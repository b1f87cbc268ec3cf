"""Front end <-> engine process transports, measured: one message of engine outputs to a spawned process and a
small reply back, median of 30, over TCP on 127.0.0.1.

    python scripts/bench_transport.py [--json OUT]

Transports: the multiprocessing connection the engine uses (pickle), with Nagle's algorithm on and off, and
ZeroMQ with msgspec (measured only where pyzmq and msgspec are installed). Messages: cumulative outputs (every
token so far, as engines return them) and the deltas of one step (engine/output_deltas.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pickle
import statistics
import time
from multiprocessing.connection import Client, Connection, Listener

from twinbatch.engine.output_deltas import DeltaEncoder
from twinbatch.engine.worker_main import no_delay
from twinbatch.outputs import CompletionOutput, RequestOutput

SIZES = [(100, 1), (256, 128), (256, 512)]  # (outputs, tokens each)


def outputs(n: int, tokens: int) -> list[RequestOutput]:
    return [RequestOutput(str(i), None, list(range(256)), [CompletionOutput(0, "x" * 4 * tokens, list(range(tokens)))],
                          False) for i in range(n)]  # fmt: skip


def deltas(n: int, tokens: int) -> list[RequestOutput]:
    """The step's message once each request has `tokens` tokens and the step before was sent."""
    encoder = DeltaEncoder()
    for out in outputs(n, tokens - 1):
        encoder.encode(out)
    return [encoder.encode(out) for out in outputs(n, tokens)]


def echo_connection(address: tuple[str, int], nagle_off: bool) -> None:
    conn = Client(address, authkey=b"bench")
    if nagle_off:
        no_delay(conn)
    while (msg := conn.recv()) is not None:
        conn.send(len(msg[1]))


def echo_zmq(address: str) -> None:
    import msgspec
    import zmq

    sock = zmq.Context().socket(zmq.PAIR)
    sock.connect(address)
    decode, encode = msgspec.msgpack.Decoder(tuple[str, list[RequestOutput], dict]).decode, msgspec.msgpack.encode
    while (data := sock.recv()) != b"stop":
        sock.send(encode(len(decode(data)[1])))


def timed(send_and_reply: object, message: tuple) -> float:
    times = []
    for _ in range(30):
        start = time.perf_counter()
        send_and_reply(message)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def over_connection(messages: dict[str, tuple], nagle_off: bool) -> dict[str, float]:
    with Listener(("127.0.0.1", 0), authkey=b"bench") as listener:
        proc = mp.get_context("spawn").Process(target=echo_connection, args=(listener.address, nagle_off))
        proc.start()
        conn: Connection = listener.accept()
    if nagle_off:
        no_delay(conn)

    def send_and_reply(message: tuple) -> None:
        conn.send(message)
        conn.recv()

    result = {name: timed(send_and_reply, m) for name, m in messages.items()}
    conn.send(None)
    proc.join()
    return result


def over_zmq(messages: dict[str, tuple]) -> dict[str, float] | None:
    try:
        import msgspec
        import zmq
    except ImportError:
        return None
    sock = zmq.Context().socket(zmq.PAIR)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc = mp.get_context("spawn").Process(target=echo_zmq, args=(f"tcp://127.0.0.1:{port}",))
    proc.start()
    decode = msgspec.msgpack.Decoder(int).decode

    def send_and_reply(message: tuple) -> None:
        sock.send(msgspec.msgpack.encode(message))
        decode(sock.recv())

    result = {name: timed(send_and_reply, m) for name, m in messages.items()}
    sock.send(b"stop")
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    messages = {f"{n} outputs of {t} tokens, cumulative": ("outputs", outputs(n, t), {}) for n, t in SIZES}
    messages |= {f"{n} outputs of {t} tokens, deltas": ("outputs", deltas(n, t), {}) for n, t in SIZES[1:]}
    results = {
        "bytes_pickled": {name: len(pickle.dumps(m)) for name, m in messages.items()},
        "connection_nagle_on_ms": over_connection(messages, nagle_off=False),
        "connection_nagle_off_ms": over_connection(messages, nagle_off=True),
        "zmq_msgspec_ms": over_zmq(messages),
    }
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
