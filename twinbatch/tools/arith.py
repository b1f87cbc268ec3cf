"""gsm8k-style arithmetic word problems, generated deterministically: the built-in model's task.

Each problem is a short story with quantities, rates, totals and differences, two to three operations deep, a
worked solution (one equation a line) and gsm8k's final line `#### <answer>`. Every quantity and every
intermediate result is a whole number from 0 to 999, and every product and quotient has a one-digit factor or
divisor, the arithmetic a small model learns in minutes. The splits come from different seeds and take disjoint
halves of the question space (a checksum decides), so no held-out question can appear in training.

    python -m twinbatch.tools.arith --split test --num 500 --out evals/arith/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jill", "Kai", "Lena", "Milo", "Nora",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Yara", "Zoe"]  # fmt: skip
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "coins", "stamps",
         "beads", "eggs", "bottles", "candles", "rocks", "buttons", "cups", "flowers", "toys", "plates"]  # fmt: skip
BOXES = ["box", "bag", "jar", "basket", "crate", "tray", "bin", "pack"]
SPLIT_SEEDS = {"train": 1, "test": 2}

Problem = dict[str, str]  # gsm8k's fields: question, answer (the worked solution, then "#### N")


def _solution(steps: list[tuple[int, str, int, int]]) -> str:
    """Equations (a, op, b, result), one a line, and the last result as gsm8k's answer line."""
    lines = [f"{a} {op} {b} = {r}." for a, op, b, r in steps]
    return "\n".join([*lines, f"#### {steps[-1][3]}"])


def _packs_left(rng: random.Random) -> tuple[str, list]:
    name, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(BOXES)
    a, b = rng.randint(2, 9), rng.randint(2, 60)
    c = rng.randint(1, a * b)
    q = (f"{name} buys {a} {box}s of {item}. Each {box} has {b} {item}. {name} gives away {c} {item}. "
         f"How many {item} does {name} have left?")  # fmt: skip
    return q, [(a, "*", b, a * b), (a * b, "-", c, a * b - c)]


def _pay(rng: random.Random) -> tuple[str, list]:
    name = rng.choice(NAMES)
    rate, d1, d2 = rng.randint(2, 99), rng.randint(1, 5), rng.randint(1, 4)
    q = (f"{name} earns {rate} dollars an hour. {name} works {d1} hours on Monday and {d2} hours on Tuesday. "
         f"How many dollars does {name} earn in the two days?")  # fmt: skip
    return q, [(d1, "+", d2, d1 + d2), (d1 + d2, "*", rate, rate * (d1 + d2))]


def _share(rng: random.Random) -> tuple[str, list]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 60)
    total = friends * each
    a = rng.randint(1, total - 1)
    q = (f"{name} has {a} {item} and finds {total - a} more. {name} shares all of them equally among {friends} "
         f"friends. How many {item} does each friend get?")  # fmt: skip
    return q, [(a, "+", total - a, total), (total, "/", friends, each)]


def _twice_fewer(rng: random.Random) -> tuple[str, list]:
    item, box = rng.choice(ITEMS), rng.choice(BOXES)
    a = rng.randint(5, 300)
    b = rng.randint(1, 2 * a - 1)
    while a + 2 * a - b > 999:
        a = rng.randint(5, 300)
        b = rng.randint(1, 2 * a - 1)
    q = (f"A red {box} holds {a} {item}. A blue {box} holds {b} fewer {item} than twice the red {box}. "
         f"How many {item} are in the two {box}s together?")  # fmt: skip
    return q, [(2, "*", a, 2 * a), (2 * a, "-", b, 2 * a - b), (a, "+", 2 * a - b, 3 * a - b)]


def _machine(rng: random.Random) -> tuple[str, list]:
    item = rng.choice(ITEMS)
    rate, hours = rng.randint(2, 99), rng.randint(3, 10)
    stop = rng.randint(1, hours - 1)
    q = (f"A machine makes {rate} {item} every hour. It runs for {hours} hours but stops for {stop} of them. "
         f"How many {item} does it make?")  # fmt: skip
    return q, [(hours, "-", stop, hours - stop), (hours - stop, "*", rate, rate * (hours - stop))]


def _change(rng: random.Random) -> tuple[str, list]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    n, price = rng.randint(2, 9), rng.randint(2, 99)
    money = rng.randint(n * price, 999)
    q = (f"{name} has {money} dollars and buys {n} {item} for {price} dollars each. "
         f"How many dollars does {name} have left?")  # fmt: skip
    return q, [(n, "*", price, n * price), (money, "-", n * price, money - n * price)]


def _pages(rng: random.Random) -> tuple[str, list]:
    name = rng.choice(NAMES)
    a, b, c, d = rng.randint(2, 55), rng.randint(2, 9), rng.randint(2, 55), rng.randint(2, 9)
    q = (f"{name} reads {a} pages a day for {b} days, then {c} pages a day for {d} days. "
         f"How many pages does {name} read in all?")  # fmt: skip
    return q, [(a, "*", b, a * b), (c, "*", d, c * d), (a * b, "+", c * d, a * b + c * d)]


def _half_of_more(rng: random.Random) -> tuple[str, list]:
    n1, n2, n3 = rng.sample(NAMES, 3)
    item = rng.choice(ITEMS)
    a = rng.randint(2, 499)
    b = rng.randint(1, 499)
    b += (a + b) % 2  # an even total halves exactly
    q = (f"{n1} has {a} {item}. {n2} has {b} more {item} than {n1}. {n3} has half as many {item} as {n2}. "
         f"How many {item} does {n3} have?")  # fmt: skip
    return q, [(a, "+", b, a + b), (a + b, "/", 2, (a + b) // 2)]


TEMPLATES: list[Callable[[random.Random], tuple[str, list]]] = [
    _packs_left, _pay, _share, _twice_fewer, _machine, _change, _pages, _half_of_more,
]  # fmt: skip


def problems(seed: int) -> Iterator[Problem]:
    """An endless, seeded stream of problems, the templates in turn at random."""
    rng = random.Random(seed)
    while True:
        question, steps = rng.choice(TEMPLATES)(rng)
        yield {"question": question, "answer": _solution(steps)}


def split(name: str, num: int) -> list[Problem]:
    """`num` distinct problems of split `name`: "test" keeps the questions whose CRC-32 is 0 mod 10, "train" the
    others, so no question can be in both, however many are drawn."""
    seen, out = set(), []
    for p in problems(SPLIT_SEEDS[name]):
        q = p["question"]
        if in_test(q) == (name == "test") and q not in seen:
            seen.add(q)
            out.append(p)
            if len(out) == num:
                return out
    raise AssertionError("unreachable: the stream is endless")


def train_problems() -> Iterator[Problem]:
    """The training split as an endless stream (repeats allowed), held-out questions left out."""
    return (p for p in problems(SPLIT_SEEDS["train"]) if not in_test(p["question"]))


def in_test(question: str) -> bool:
    return zlib.crc32(question.encode()) % 10 == 0


def answer_of(solution: str) -> str:
    """gsm8k's answer: what follows `#### ` on the last line."""
    return solution.rsplit("#### ", 1)[-1].strip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="test")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--out", type=Path, required=True, help="a jsonl file of gsm8k rows (question, answer)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for row in split(args.split, args.num):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
