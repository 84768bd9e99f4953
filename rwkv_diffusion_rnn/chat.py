"""Talk to a model trained on conversations: ``python -m rwkv_diffusion_rnn.chat checkpoint=<dir> [key=value ...]``.

Each line typed is a user turn; the answer is decoded as ``generate chat=true`` does (the same
``key=value`` decoding options: ``steps``, ``length``, ``block_length``, ``remasking``,
``threshold``, ``temperature``, ``system``, ...), with the conversation so far as its prompt, and
printed. ``/reset`` starts a new conversation; an empty line, ``/quit`` or end of input ends.
"""

from __future__ import annotations

import sys
from typing import List, Optional, Sequence, TextIO, Tuple


def chat_loop(argv: Sequence[str], lines: TextIO = sys.stdin, out: TextIO = sys.stdout) -> List[Tuple[str, str]]:
    """Answers each line of ``lines``; returns the last conversation's turns."""
    import dataclasses

    from rwkv_diffusion_rnn.generate import check_options, generate, parse_options
    from rwkv_diffusion_rnn.training.trained import load_trained
    g = parse_options(argv)
    if g.prompt is not None or g.conversation is not None:
        raise ValueError("chat reads the user's turns from its input; prompt= and conversation= belong to generate")
    g = dataclasses.replace(g, chat=True, print_texts=False, progress_bar=False, num_samples=1)
    check_options(dataclasses.replace(g, prompt="-"))      # refuse bad options before loading the model
    trained = load_trained(g.checkpoint, device=g.device, trust_remote_code=g.trust_remote_code)
    turns: List[Tuple[str, str]] = []
    interactive = lines.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line or not line.strip() or line.strip() == "/quit":
            return turns
        if line.strip() == "/reset":
            turns = []
            continue
        turns.append(("user", line.rstrip("\n")))
        answer = generate(config=g, trained=trained, turns=turns)[0]["text"]
        turns.append(("assistant", answer))
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
