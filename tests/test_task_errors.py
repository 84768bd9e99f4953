"""The error breakdown of eval/task_errors.py, on predictions built by hand."""
import importlib.util
from pathlib import Path

import torch

from rwkv_diffusion_rnn.data.tasks import make_task

_spec = importlib.util.spec_from_file_location(
    "task_errors", Path(__file__).resolve().parents[1] / "eval" / "task_errors.py")
task_errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_errors)


def _answer_from(task, batch, start, flip=False):
    """Predictions equal to the truth, with the answer replaced by the field at ``start``."""
    pred = batch.input_ids.clone()
    field = batch.input_ids[:, start:start + task.answer_len]
    pred[batch.maskable] = (field.flip(1) if flip else field).reshape(-1)
    return pred


def test_given_fields_of_rightcopy_are_x_and_r():
    task = make_task("rightcopy", seq_len=64)
    assert task_errors.given_fields(task) == [("l=", 2), (";r=", 24)]


def test_copying_the_wrong_field_is_attributed_to_it():
    task = make_task("rightcopy", seq_len=64)
    batch = task.fixed_eval_set(50)
    out = task_errors.breakdown(task, _answer_from(task, batch, 2), batch)
    assert out["errors_from_given_field"]["l="]["same_offset"] == 1.0
    assert out["errors_from_given_field"][";r="]["same_offset"] == 0.0     # R is the truth: no error
    assert out["acc"] < 0.2
    perfect = task_errors.breakdown(task, _answer_from(task, batch, 24), batch)
    assert perfect["acc"] == 1.0 and perfect["acc_by_offset"] == [1.0] * task.answer_len


def test_rightrev_reversed_copy_and_neighbours():
    task = make_task("rightrev", seq_len=64)
    batch = task.fixed_eval_set(50)
    out = task_errors.breakdown(task, _answer_from(task, batch, 24), batch)   # R not reversed
    assert out["errors_from_given_field"][";r="]["same_offset"] == 1.0
    # shifting the true answer one place to the right: every wrong character is its left neighbour
    pred = batch.input_ids.clone()
    ans = batch.maskable
    rows = batch.input_ids[ans].view(len(pred), -1)
    pred[ans] = torch.cat([rows[:, :1], rows[:, :-1]], dim=1).reshape(-1)
    out = task_errors.breakdown(task, pred, batch)
    assert out["errors_left_neighbour"] == 1.0
