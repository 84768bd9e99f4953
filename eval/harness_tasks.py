"""Two lm-eval tasks over tinyshakespeare's validation text, as local YAML + JSONL (no download):

    python eval/harness_tasks.py       # writes eval/out/harness_tasks, the folder lm-eval's --include_path reads

``shakespeare_ppl`` (``loglikelihood_rolling``): every speech of the validation split (the last
10% of the characters, the split ``experiment=shakespeare_char`` validates on; speeches are the
blocks between blank lines), scored whole: word perplexity, byte perplexity and bits per byte.
``shakespeare_mc`` (``multiple_choice``, ``--n-mc`` questions, seeded): two consecutive lines of
a validation speech as the context, the line that follows them and three spoken lines (not a
speaker's name) drawn from other validation speeches as the choices (in a seeded order); accuracy
and length-normalised accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
VAL_FRACTION = 0.1      # data.val_fraction of experiment=shakespeare_char

PPL = """task: shakespeare_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
MC = """task: shakespeare_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: "\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def spoken(speech: str) -> list:
    """The lines of a speech that are spoken: not a speaker's name ("BIANCA:", "First Citizen:"), which as a
    distractor would be a short line any model ranks high by total log-likelihood."""
    return [line for line in speech.splitlines() if not (line.endswith(":") and len(line.split()) <= 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path, default=ROOT / "eval" / "out" / "harness_tasks")
    ap.add_argument("--n-mc", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    text = args.corpus.read_text(encoding="utf-8")
    val = text[int(len(text) * (1 - VAL_FRACTION)):]
    speeches = [s.strip("\n") for s in val.split("\n\n")][1:]     # the first block is cut by the split
    speeches = [s for s in speeches if s.strip()]
    rng = random.Random(args.seed)
    questions = []
    candidates = [(i, k) for i, s in enumerate(speeches) for k in range(len(s.splitlines()) - 2)]
    for i, k in rng.sample(candidates, min(args.n_mc, len(candidates))):
        lines = speeches[i].splitlines()
        others = [rng.choice(spoken(speeches[j])) for j in rng.sample(
            [j for j in range(len(speeches)) if j != i and spoken(speeches[j])], 3)]
        choices = [lines[k + 2], *others]
        rng.shuffle(choices)
        questions.append({"context": "\n".join(lines[k:k + 2]), "choices": choices,
                          "answer": choices.index(lines[k + 2])})
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows, yaml in (("shakespeare_ppl", [{"text": s} for s in speeches], PPL),
                             ("shakespeare_mc", questions, MC)):
        data = (args.out / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (args.out / f"{name}.yaml").write_text(yaml.format(data=data), encoding="utf-8")
        print(f"{name}: {len(rows)} documents -> {data}")


if __name__ == "__main__":
    main()
