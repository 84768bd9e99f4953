"""Where a task model goes wrong: trains one run of a synthetic task and breaks its errors on the
fixed evaluation set down by answer position and decoding mode.

    python eval/task_errors.py rightcopy --seed 1 [Hydra overrides ...]

For each decoding mode (threshold 0.9 as in the task table, one token per step, all at once) it
prints token accuracy, exact match, accuracy at each answer offset, and the share of wrong
characters that equal the answer's left or right neighbour (chance: about 1/9 each), which is
what a blurred position code produces on the copy tasks, and, for each given field as long as
the answer (e.g. X and R of rightcopy), the share of wrong characters that equal that field's
character at the same offset or at the reversed offset (chance: about 1/10), which shows whether
the model copies from the wrong field.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch

from rwkv_diffusion_rnn.training.improved_trainer import Trainer
from rwkv_diffusion_rnn.diffusion.sampling import generate_text
from rwkv_diffusion_rnn.train_rwkv import compose_config

MODES = {"threshold 0.9": dict(steps=32, threshold=0.9),
         "one per step": dict(steps=None, threshold=None),  # steps = answer length, set below
         "all at once": dict(steps=1, threshold=None)}


def given_fields(task) -> list:
    """(label, start) of every given (not masked) field of answer length, in the fixed layout:
    the label is the text just before the field, e.g. ``"l="``."""
    fields, pos, label = [], 0, ""
    for piece in task._pieces(1, torch.Generator().manual_seed(0)):
        if isinstance(piece, str):
            pos, label = pos + len(piece), piece
            continue
        values, maskable = piece
        if not maskable and values.shape[1] == task.answer_len:
            fields.append((label, pos))
        pos += values.shape[1]
    return fields


def breakdown(task, pred: torch.Tensor, batch) -> dict:
    score = task.score(pred, batch)
    ok = pred == batch.input_ids
    ans = batch.maskable
    offset = ans.long().cumsum(1) - 1                                  # answer offset per position
    err = ans & ~ok
    left = torch.zeros_like(err)
    right = torch.zeros_like(err)
    left[:, 1:] = (pred[:, 1:] == batch.input_ids[:, :-1]) & ans[:, :-1]
    right[:, :-1] = (pred[:, :-1] == batch.input_ids[:, 1:]) & ans[:, 1:]
    n_err = max(1, int(err.sum()))
    # errors and predictions on the answer as [B, answer_len] (every row has answer_len maskable)
    L = task.answer_len
    a_err, a_pred = err[ans].view(-1, L), pred[ans].view(-1, L)
    from_fields = {}
    for label, start in given_fields(task):
        field = batch.input_ids[:, start:start + L]
        from_fields[label] = {"same_offset": round(float((a_err & (a_pred == field)).sum()) / n_err, 3),
                              "reversed_offset": round(float((a_err & (a_pred == field.flip(1))).sum()) / n_err, 3)}
    return {
        "acc": round(score["acc"], 4),
        "exact": round(score["exact"], 4),
        "acc_by_offset": [round(float(ok[ans & (offset == j)].float().mean()), 3)
                          for j in range(task.answer_len)],
        "errors_left_neighbour": round(float((err & left).sum()) / n_err, 3),
        "errors_right_neighbour": round(float((err & right).sum()) / n_err, 3),
        "errors_from_given_field": from_fields,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mixer", default="bi")
    ap.add_argument("overrides", nargs="*", help="further Hydra overrides")
    args = ap.parse_intermixed_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([f"experiment={args.task}", f"model.mixer={args.mixer}", f"seed={args.seed}",
                              f"logging.save_dir={tmp}", "eval.fresh=false", *args.overrides])
        trainer = Trainer(cfg)
        trainer.train()
    model = trainer.model.eval()
    task, batch = trainer.data.task, trainer.data.eval_set
    masked = batch.masked_input(task.mask_id)
    for name, kw in MODES.items():
        kw = dict(kw, steps=kw["steps"] or task.answer_len)
        pred = generate_text(model, prompt_ids=masked, generator=torch.Generator().manual_seed(0), **kw)
        print(f"{name}: {json.dumps(breakdown(task, pred, batch))}", flush=True)


if __name__ == "__main__":
    main()
