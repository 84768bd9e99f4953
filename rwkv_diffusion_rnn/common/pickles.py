"""Telling a pickled file that the safe loader refused (complete, but holding Python objects) from
one that is broken, without executing anything: ``torch.load(..., weights_only=True)`` raises
the same error type for both, and the advice differs (re-save after checking you trust it, or
re-download)."""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Optional, Union

# Pickle opcodes are parsed (never executed) to tell a refused-but-complete file from a broken one.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # how torch.save's legacy format starts
_LEGACY_PICKLES = 5  # magic, protocol version, sys info, the object, its storage keys


def unsafe_pickle_reason(path: Union[str, os.PathLike], error: BaseException) -> Optional[str]:
    """Why ``torch.load(path, weights_only=True)`` raised ``error`` when the file is complete but
    holds pickled objects the safe loader refuses (a sentence for an error message), or None when
    the file is truncated, corrupted or not a pickle at all (then "re-download" is the advice)."""
    if not (isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)):
        return None
    if zipfile.is_zipfile(path):  # the zip's central directory is at its end: the file is whole
        layout = ""
    else:
        kind = _pickle_layout(Path(path))
        if kind is None:
            return None  # a truncated legacy file is refused with the same error type
        layout = ("; it is in the legacy torch.save format" if kind == "legacy"
                  else "; it is a plain pickle, not a torch.save file")
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    what = f" (it refers to {found.group(1)})" if found else ""
    return (f"holds pickled Python objects that are not loaded for safety{what}{layout}. Re-save it with "
            "torch.save(state_dict) in a current PyTorch (tensors and plain values only), after checking "
            "you trust it")


def _pickle_layout(path: Path) -> Optional[str]:
    """"legacy" (torch.save without zip), "pickle" (one complete pickle), or None (broken)."""
    try:
        with open(path, "rb") as f:
            legacy = f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
            f.seek(0)
            for _ in range(_LEGACY_PICKLES if legacy else 1):
                for _op in pickletools.genops(f):
                    pass
    except Exception:  # genops raises ValueError and others on a truncated or non-pickle stream
        return None
    return "legacy" if legacy else "pickle"
