"""Instructions with checkable answers, for instruction tuning (``experiment=sft_tasks``).

    python -m rwkv_diffusion_rnn.data.instructions --out preprocessed_data/sft_tasks

writes ``train.jsonl`` and ``heldout.jsonl``: conversations (one user turn, one assistant turn,
and a ``task`` field) of four tasks, each asked in several phrasings:

* ``reverse``: a word of 3-6 letters written backwards;
* ``sort``: 3-6 digits in ascending order;
* ``add``: the sum of two numbers below 100;
* ``capitalise``: a word in capital letters.

The held-out set draws from its own seed and keeps no instruction that the training set holds
(the same task, phrasing and operands), so exact match on it measures the skill, not recall.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Dict, List

PHRASINGS = {
    "reverse": ["reverse: {w}", "Reverse the word {w}.", "Write {w} backwards.", "What is {w} spelled backwards?"],
    "sort": ["sort the digits {d}", "Sort these digits: {d}", "Put {d} in ascending order."],
    "add": ["add {a} and {b}", "What is {a} + {b}?", "{a} plus {b} = ?"],
    "capitalise": ["capitalise: {w}", "Write {w} in capital letters.", "uppercase {w}"],
}
TASKS = tuple(PHRASINGS)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def instruction(task: str, rnd: random.Random) -> Dict[str, str]:
    """One instruction of ``task``: its user turn and the answer."""
    phrasing = rnd.choice(PHRASINGS[task])
    if task in ("reverse", "capitalise"):
        w = "".join(rnd.choice(LETTERS) for _ in range(rnd.randint(3, 6)))
        answer = w[::-1] if task == "reverse" else w.upper()
        return {"prompt": phrasing.format(w=w), "answer": answer}
    if task == "sort":
        d = "".join(rnd.choice("0123456789") for _ in range(rnd.randint(3, 6)))
        return {"prompt": phrasing.format(d=d), "answer": "".join(sorted(d))}
    a, b = rnd.randint(0, 99), rnd.randint(0, 99)
    return {"prompt": phrasing.format(a=a, b=b), "answer": str(a + b)}


def conversation(task: str, item: Dict[str, str]) -> dict:
    return {"task": task, "conversations": [{"from": "human", "value": item["prompt"]},
                                            {"from": "gpt", "value": item["answer"]}]}


def make_sets(n_train: int, n_heldout: int, seed: int = 0) -> Dict[str, List[dict]]:
    """``{"train": [...], "heldout": [...]}``: tasks in turn, held-out instructions unseen in training."""
    rnd = random.Random(seed)
    train = [conversation(TASKS[i % len(TASKS)], instruction(TASKS[i % len(TASKS)], rnd)) for i in range(n_train)]
    seen = {c["conversations"][0]["value"] for c in train}
    rnd = random.Random(seed + 1_000_003)
    heldout: List[dict] = []
    while len(heldout) < n_heldout:
        task = TASKS[len(heldout) % len(TASKS)]
        item = instruction(task, rnd)
        if item["prompt"] not in seen:
            seen.add(item["prompt"])
            heldout.append(conversation(task, item))
    return {"train": train, "heldout": heldout}


def write_sets(out, n_train: int = 20000, n_heldout: int = 400, seed: int = 0) -> Dict[str, Path]:
    """Writes ``<out>/train.jsonl`` and ``<out>/heldout.jsonl``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_sets(n_train, n_heldout, seed).items():
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
        paths[name] = path
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train.jsonl and heldout.jsonl")
    p.add_argument("--train", type=int, default=20000, help="training conversations")
    p.add_argument("--heldout", type=int, default=400, help="held-out conversations")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train < 1 or args.heldout < 1:
        sys.exit("error: --train and --heldout must be >= 1")
    paths = write_sets(args.out, args.train, args.heldout, args.seed)
    print(f"wrote {args.train} conversations to {paths['train']} and {args.heldout} to {paths['heldout']}")


if __name__ == "__main__":
    main()
