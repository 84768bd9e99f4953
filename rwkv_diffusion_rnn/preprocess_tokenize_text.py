"""The preprocess_tokenize_text command: tokenize the texts of a data list into one ``.npz`` per
example, paired with the latents by file stem.

    python -m rwkv_diffusion_rnn.preprocess_tokenize_text \\
        --json_path preprocessed_data/qwen_32d/train_data.json \\
        --output_dir preprocessed_data/rwkv_tokens --tokenizer BlinkDL/rwkv7-g1 --max_length 512

(``python rwkv_diffusion_rnn/preprocess_tokenize_text.py ...`` works too.) Writes
``<output_dir>/<split>/<stem>.npz`` (``input_ids`` + ``attention_mask``) and ``tokens_info.json``;
the file format, which files a re-run rewrites and how a killed run is recovered are described in
:mod:`rwkv_diffusion_rnn.data.token_files`, which does the work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/preprocess_tokenize_text.py
    # Import the package from the checkout, and keep the package's own folder off sys.path so
    # its modules cannot shadow top-level ones.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

from rwkv_diffusion_rnn.common.errors import DataFormatError
from rwkv_diffusion_rnn.common.hub_options import add_hub_options
from rwkv_diffusion_rnn.data.token_files import tokenize_json
from rwkv_diffusion_rnn.data.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rwkv_diffusion_rnn.preprocess_tokenize_text",
        description="Tokenize the texts of a data list (train_data.json) into <output_dir>/<split>/<stem>.npz "
        "files (input_ids + attention_mask, padded to --max_length) that pair with the latents by file stem.",
    )
    p.add_argument("--json_path", "--json-path", required=True, help="data list: JSON list of {\"text\", \"latent_path\"}")
    p.add_argument("--output_dir", "--output-dir", required=True, help="token root; files go to <output_dir>/<split>/")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help=f"tokenizer name or path (default {DEFAULT_TOKENIZER}: RWKV World, no download)")
    p.add_argument("--max_length", "--max-length", type=int, default=512, help="tokens per example; longer texts are cut")
    p.add_argument("--split", default=None, help="subdirectory name (default: from the JSON name, train_data.json -> train)")
    p.add_argument("--overwrite", action="store_true", help="rewrite files that already exist")
    p.add_argument("--batch_size", "--batch-size", type=int, default=1024, help="texts encoded per call")
    p.add_argument("--max_samples", "--max-samples", type=int, default=None, help="only the first N entries")
    add_hub_options(p, "the tokenizer")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tok = load_tokenizer(
            args.tokenizer,
            revision=args.revision,
            cache_dir=args.cache_dir,
            local_files_only=args.local_files_only,
            trust_remote_code=args.trust_remote_code,
        )
        summary = tokenize_json(
            args.json_path,
            args.output_dir,
            tok,
            max_length=args.max_length,
            split=args.split,
            overwrite=args.overwrite,
            batch_size=args.batch_size,
            max_samples=args.max_samples,
            tokenizer_name=args.tokenizer,
        )
    except (DataFormatError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
