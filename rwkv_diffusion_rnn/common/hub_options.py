"""The Hugging Face loading flags of the preprocessing commands (``prepare_latents``,
``preprocess_tokenize_text``), defined once so both commands spell them alike.

The DiffRwkv README documents ``--trust-remote-code``, ``--local-files-only`` and ``--cache-dir``
with hyphens, so those are the spellings shown first; the underscore forms are accepted too,
because every other flag of these commands (``--json_path``, ``--max_length``, ...) uses underscores
and users mix the two.
"""

from __future__ import annotations

import argparse


def add_hub_options(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--cache-dir``, ``--revision``, ``--local-files-only`` and ``--trust-remote-code``
    (dests ``cache_dir``, ``revision``, ``local_files_only``, ``trust_remote_code``); ``what``
    names the thing they load in the help, e.g. ``"the tokenizer"``."""
    parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None, metavar="DIR",
                        help=f"Hugging Face cache directory for {what}")
    parser.add_argument("--revision", default=None, help=f"revision of {what} (branch, tag or commit)")
    parser.add_argument("--local-files-only", "--local_files_only", dest="local_files_only", action="store_true",
                        help=f"never download {what}; use the cache (--cache-dir)")
    parser.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                        help=f"let {what} run its own code (trusted sources only)")
