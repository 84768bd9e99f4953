"""Every error type the project raises for its users, in one place.

Each is a :class:`ProjectError` (the command lines catch that one type and print the message
without a traceback) and also the built-in type code outside the project would catch
(``ValueError`` for bad input, ``RuntimeError`` for a run that cannot go on, ``OSError`` for a
failed write). A message names what was wrong, where (the file, entry or config key) and what to
do; the docstring of each type says what its message must contain.
"""

from __future__ import annotations


class ProjectError(Exception):
    """Base of the project's errors: a problem the user can fix, reported as its message alone."""


class ConfigError(ProjectError, ValueError):
    """A configuration that cannot work. Names the config key (``model.mixer=...``), the value
    and the value or key to set instead."""


class CheckpointError(ProjectError, ValueError):
    """A checkpoint that cannot be used: pretrained RWKV-7 weights that cannot be read, or a
    training checkpoint of this project that is missing, incomplete, corrupted or does not fit
    the run. Names the file or directory, what is wrong and what to do (for a training
    checkpoint, which earlier one in the save_dir is intact and how to resume from it)."""


class NonFiniteError(CheckpointError):
    """``save_checkpoint`` refused weights holding NaN or inf; nothing was written. Names the
    first parameter at fault."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (no space left, a read-only or vanished save_dir, ...). The
    half-written directory is removed and no existing checkpoint is touched. Also an OSError so
    that code catching disk errors still catches it; ``errno`` is the failure's when known. Names
    the file whose write failed and the cause."""


class DataFormatError(ProjectError, ValueError):
    """A data file is missing, malformed or does not match the model settings. Names the file
    (and the entry, line or token position) and the fix."""


class UnknownCharacterError(ProjectError, ValueError):
    """A text holds a character outside a ``CharTokenizer``'s vocabulary. ``char`` is the
    character and ``position`` its index in the text that was encoded; the message names both and
    the vocabulary's size (callers add the file)."""

    def __init__(self, char: str, position: int, vocab_chars: int):
        self.char = char
        self.position = position
        super().__init__(
            f"character {char!r} (U+{ord(char):04X}) at position {position} is not in the chars "
            f"vocabulary of {vocab_chars} characters"
        )


class LatentPrepError(ProjectError, ValueError):
    """Bad input for latent preparation (corpus, embeddings or embedding model). Names the file
    or model and the fix."""


class RunLockedError(ProjectError, RuntimeError):
    """Another live process is writing into this run folder. Names the folder and the owner
    (pid, host, command)."""


class TrainingDiverged(ProjectError, RuntimeError):
    """More than ``training.max_bad_steps`` steps in a row had a non-finite loss or gradient.
    Names the step, the last good checkpoint and the settings to change."""


class OtherRankFailed(ProjectError, RuntimeError):
    """Rank 0 failed at a step every rank takes together; rank 0 reports why."""


class DemoError(ProjectError, RuntimeError):
    """A demo step cannot go on; the message says which step and what to do."""


def first_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``: how a wrapped error is quoted in another's."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
