"""Talk to a model trained on conversations: ``python -m rwkv_diffusion_rnn.chat checkpoint=<dir> [key=value ...]``.

Each line typed is a user turn; the answer is decoded as ``generate chat=true`` does (the same
``key=value`` decoding options: ``steps``, ``length``, ``block_length``, ``remasking``,
``threshold``, ``temperature``, ``system``, ...), with the conversation so far as its prompt, and
printed. ``/reset`` starts a new conversation; an empty line, ``/quit`` or end of input ends.

The prompt keeps the last turns that fit the model's ``data.seq_len`` with room for the answer
(``length`` tokens, or when unset at least a quarter of ``data.seq_len``): the oldest exchanges
are dropped first, and each drop is said on stderr. A turn that fails (e.g. a character the
vocabulary lacks) is reported on stderr and left out of the conversation; the next line is read.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Sequence, TextIO, Tuple


# Without length=, an answer gets what data.seq_len leaves after the prompt; older turns are dropped
# before that is less than this share of data.seq_len, so a long conversation does not cut every answer short.
MIN_ANSWER_SHARE = 4


def fit_turns(turns: List[Tuple[str, str]], prompt_length: Callable[[List[Tuple[str, str]]], int],
              seq_len: int, answer_room: int) -> int:
    """How many of the oldest exchanges (a user turn and its answer) to drop from ``turns`` (ending
    with a user turn) so that ``prompt_length`` + ``answer_room`` fits ``seq_len``. The last user
    turn is always kept: when it alone does not fit, generating it says why."""
    exchanges = (len(turns) - 1) // 2
    for dropped in range(exchanges + 1):
        if prompt_length(turns[2 * dropped:]) + answer_room <= seq_len:
            return dropped
    return exchanges


def chat_loop(argv: Sequence[str], lines: TextIO = sys.stdin, out: TextIO = sys.stdout,
              err: TextIO = sys.stderr) -> List[Tuple[str, str]]:
    """Answers each line of ``lines``; returns the last conversation's turns (all of them, those
    dropped from the prompt too)."""
    import dataclasses

    from rwkv_diffusion_rnn.common.errors import ProjectError
    from rwkv_diffusion_rnn.generate import (check_options, chat_prompt_ids, chat_template_of, generate,
                                             parse_options)
    from rwkv_diffusion_rnn.training.trained import load_trained
    g = parse_options(argv)
    if g.prompt is not None or g.conversation is not None:
        raise ValueError("chat reads the user's turns from its input; prompt= and conversation= belong to generate")
    g = dataclasses.replace(g, chat=True, print_texts=False, progress_bar=False, num_samples=1)
    check_options(dataclasses.replace(g, prompt="-"))      # refuse bad options before loading the model
    trained = load_trained(g.checkpoint, device=g.device, trust_remote_code=g.trust_remote_code,
                           tokenizer_path=g.tokenizer_path)
    template, seq_len = chat_template_of(trained.cfg), int(trained.cfg.data.seq_len)
    answer_room = g.length if g.length is not None else max(1, seq_len // MIN_ANSWER_SHARE)

    def prompt_length(kept):
        return len(chat_prompt_ids(trained.tokenizer, template, g.system, kept,
                                   "the conversation as the chat template renders it"))

    turns: List[Tuple[str, str]] = []
    start = 0           # the prompt holds turns[start:]; the older ones were dropped to fit
    interactive = lines.isatty()
    while True:
        if interactive:
            print("> ", end="", file=err, flush=True)
        line = lines.readline()
        if not line or not line.strip() or line.strip() == "/quit":
            return turns
        if line.strip() == "/reset":
            turns, start = [], 0
            continue
        asked = [*turns[start:], ("user", line.rstrip("\n"))]
        try:
            dropped = fit_turns(asked, prompt_length, seq_len, answer_room)
            answer = generate(config=g, trained=trained, turns=asked[2 * dropped:])[0]["text"]
        except (ProjectError, ValueError) as e:
            # one bad turn (a character outside the vocabulary, a prompt too long alone) leaves the
            # conversation as it was
            print(f"error: {e}\n(type /reset to start over)", file=err, flush=True)
            continue
        if dropped:
            which = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
            print(f"(dropped {which} to fit data.seq_len={seq_len})", file=err, flush=True)
        turns += [asked[-1], ("assistant", answer)]
        start += 2 * dropped
        print(answer, file=out, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    from rwkv_diffusion_rnn.common.errors import ProjectError
    try:
        chat_loop(argv)
    except (ProjectError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
