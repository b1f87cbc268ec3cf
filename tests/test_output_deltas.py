"""The rank-to-front-end delta protocol (engine/output_deltas.py): encoded on one side and decoded on the other,
every cumulative output comes back equal, while what travels holds only what each step added."""

import pickle
import random

from twinbatch.engine.output_deltas import DeltaDecoder, DeltaEncoder
from twinbatch.outputs import CompletionOutput, Logprob, RequestError, RequestOutput


def cumulative_outputs(seed: int) -> list[RequestOutput]:
    """Outputs of 6 interleaved requests as an engine makes them: tokens, text and logprobs growing, prompt
    logprobs appearing once scored, each ending finished (one failed after some tokens)."""
    rng = random.Random(seed)
    state = {f"r{i}": {"prompt": [rng.randrange(100) for _ in range(rng.randint(1, 40))], "tokens": [], "steps": 0,
                       "end": rng.randint(1, 12)} for i in range(6)}  # fmt: skip
    outs = []
    while state:
        rid = rng.choice(sorted(state))
        s = state[rid]
        s["steps"] += 1
        s["tokens"].append(rng.randrange(1000))
        finished = s["steps"] == s["end"]
        logprobs = [{t: Logprob(-0.5 * i, 1)} for i, t in enumerate(s["tokens"])] if rid != "r1" else None
        text = "".join(f"<{t}>" for t in s["tokens"][: max(0, len(s["tokens"]) - 1 + finished)])  # one held back
        scored = [None] + [{t: Logprob(-1.0, 2)} for t in s["prompt"][1:]] if s["steps"] > 1 or finished else None
        completion = CompletionOutput(0, text, list(s["tokens"]), "length" if finished else None, None, logprobs)
        out = RequestOutput(rid, f"prompt {rid}", s["prompt"], [completion], finished, scored, engine_index=1)
        if finished and rid == "r2":
            out = RequestOutput.failed(rid, RequestError("boom", bad_input=False), 1)
        outs.append(out)
        if finished:
            del state[rid]
    return outs


def test_decoded_outputs_equal_the_engine_s_and_deltas_carry_only_what_is_new() -> None:
    for seed in range(5):
        encoder, decoder = DeltaEncoder(), DeltaDecoder()
        for out in cumulative_outputs(seed):
            wire = pickle.loads(pickle.dumps(encoder.encode(out)))
            got = decoder.decode(wire)
            if out.error is not None:  # a request failing after some tokens keeps them, and ends with its error
                assert got.error == out.error and got.finished and got.outputs[0].finish_reason == "error"
                continue
            assert got == out
            if wire.prompt is None:  # not its first output: only the new token
                assert wire.prompt_token_ids == [] and len(wire.outputs[0].token_ids) == 1
        assert not encoder.sent and not decoder.partial  # every request finished: nothing kept


def test_outputs_handed_out_are_never_changed_later() -> None:
    encoder, decoder = DeltaEncoder(), DeltaDecoder()
    handed = []
    for out in cumulative_outputs(0):
        handed.append((decoder.decode(encoder.encode(out)), pickle.dumps(out)))
    assert all(pickle.dumps(got) == before or got.error for got, before in handed)


def test_aborted_requests_are_forgotten() -> None:
    encoder, decoder = DeltaEncoder(), DeltaDecoder()
    first = cumulative_outputs(1)[0]
    decoder.decode(encoder.encode(first))
    encoder.forget(first.request_id)
    decoder.forget(first.request_id)
    assert not encoder.sent and not decoder.partial
