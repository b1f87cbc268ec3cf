"""The built-in model's task and training script (twinbatch/tools): the problems are deterministic and correct,
the held-out split shares no question with training, and a few training steps write a checkpoint that
transformers and the engine both load, with the engine's logits equal to transformers' in float32."""

import itertools
import json
import re
from pathlib import Path

from helpers import assert_matches_hf

from twinbatch import LLM
from twinbatch.tools.arith import answer_of, in_test, split, train_problems
from twinbatch.tools.train_builtin import evaluate, parser, train

EQUATION = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$")
OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


def test_problems_are_deterministic_and_their_solutions_correct() -> None:
    problems = split("test", 300)
    assert problems == split("test", 300) and len({p["question"] for p in problems}) == 300
    for p in problems:
        *lines, last = p["answer"].split("\n")
        results = []
        for line in lines:
            a, op, b, r = EQUATION.match(line).groups()
            assert OPS[op](int(a), int(b)) == int(r) and (op != "/" or int(a) % int(b) == 0), line
            assert op in "+-" or (min(int(a), int(b)) < 10 if op == "*" else int(b) < 10), line  # a one-digit factor
            results.append(int(r))
        assert last == f"#### {results[-1]}" and answer_of(p["answer"]) == str(results[-1])
        numbers = [int(n) for n in re.findall(r"\d+", p["question"] + p["answer"])]
        assert all(0 <= n <= 999 for n in numbers), p
        assert 2 <= len(lines) <= 3


def test_the_lm_eval_data_is_the_held_out_split() -> None:
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "evals/arith/test.jsonl").open()]
    assert rows == split("test", 500)


def test_the_held_out_split_shares_no_question_with_training() -> None:
    test = {p["question"] for p in split("test", 500)}
    train = {p["question"] for p in itertools.islice(train_problems(), 100_000)}
    assert all(in_test(q) for q in test) and not any(in_test(q) for q in train)
    assert not test & train and len(train) > 50_000  # a draw of the training stream: many distinct questions


def test_a_few_training_steps_give_a_checkpoint_the_engine_serves_as_transformers_does(tmp_path: Path) -> None:
    flags = "--device cpu --max-steps 12 --batch-size 4 --seq-len 128 --warmup 2 --tokenizer-docs 2000 --log-every 0"
    args = parser().parse_args(["--out", str(tmp_path), *flags.split()])
    small = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=2)  # fmt: skip
    report = train(args, small)
    assert report["steps"] == 12 and report["last_loss"] < report["first_loss"]
    shares = report["expert_shares"]  # the last step's, of every MoE layer (the balancing loss sees them all)
    assert len(shares) == 3 and all(len(s) == 8 and abs(sum(s) - 1) < 1e-6 for s in shares)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in tmp_path.iterdir()}
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=256)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer(p["question"])["input_ids"] for p in split("test", 3)]
    assert all(ids[0] == tokenizer.bos_token_id for ids in prompts)
    assert_matches_hf(tmp_path, llm, prompts)
    # what the script reports at the end: 12 steps answer nothing right, and nothing may be scored right by accident
    assert evaluate(tmp_path, 4, dtype="float32") == {"problems": 4, "exact_match": 0.0}
