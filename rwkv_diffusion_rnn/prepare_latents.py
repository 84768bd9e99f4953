"""The prepare_latents command: sentence latents for a text corpus (embed with a
sentence-transformers model, project by PCA).

    python -m rwkv_diffusion_rnn.prepare_latents --input corpus.txt --name qwen_32d \\
        --model Qwen/Qwen3-Embedding-0.6B --latent_dim 32

(``python rwkv_diffusion_rnn/prepare_latents.py ...`` works too.) Writes
``<output_root>/<name>/latents/{train,val}/*.npy``, ``train_data.json``, ``val_data.json`` and the
projection; the formats, the projection and the crash-safe swap of a replaced dataset are described
in :mod:`rwkv_diffusion_rnn.data.latents`, which does the work (``encode_texts`` there encodes new
text with a saved projection).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/prepare_latents.py
    # Import the package from the checkout, and keep the package's own folder off sys.path so
    # its modules cannot shadow top-level ones.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

from rwkv_diffusion_rnn.common.errors import DataFormatError, LatentPrepError
from rwkv_diffusion_rnn.common.hub_options import add_hub_options
from rwkv_diffusion_rnn.data.latents import DEFAULT_MODEL, prepare_latents

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rwkv_diffusion_rnn.prepare_latents",
        description="Embed a text corpus with a sentence-transformers model and project the embeddings "
        "to --latent_dim by PCA (fitted on the train split), writing <output_root>/<name>/latents/{train,val}/*.npy, "
        "train_data.json, val_data.json and the projection.",
    )
    p.add_argument("--input", required=True, help=".txt (one example per line), .jsonl or .json with a text field")
    p.add_argument("--name", required=True, help="dataset name: output goes to <output_root>/<name>/")
    p.add_argument("--output_root", "--output-root", default="preprocessed_data")
    p.add_argument("--model", default=None,
                   help=f"sentence-transformers model name or local path (default {DEFAULT_MODEL}, packaged, offline; "
                        "for real runs Qwen/Qwen3-Embedding-0.6B). With --project_only: the model that made the "
                        "embeddings, recorded so encode_texts can embed new text the same way")
    p.add_argument("--latent_dim", "--latent-dim", type=int, default=32)
    p.add_argument("--val_fraction", "--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--batch_size", "--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--max_samples", "--max-samples", type=int, default=None, help="use only the first N examples")
    p.add_argument("--no_whiten", "--no-whiten", action="store_true",
                   help="keep PCA scale (default: scale each latent dim to unit variance on train)")
    p.add_argument("--normalize_embeddings", "--normalize-embeddings", action="store_true",
                   help="L2-normalise embeddings before the projection")
    p.add_argument("--project_only", "--project-only", action="store_true",
                   help="do not run a model: project existing .npy embeddings")
    p.add_argument("--embeddings_dir", "--embeddings-dir", default=None,
                   help="with --project_only: directory of one .npy embedding per input text (paired in name order)")
    p.add_argument("--text_field", "--text-field", default="text", help="JSON field holding the text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <output_root>/<name>/")
    add_hub_options(p, "--model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = prepare_latents(
            args.input,
            args.name,
            output_root=args.output_root,
            model=args.model,
            latent_dim=args.latent_dim,
            val_fraction=args.val_fraction,
            seed=args.seed,
            batch_size=args.batch_size,
            device=args.device,
            max_samples=args.max_samples,
            whiten=not args.no_whiten,
            normalize_embeddings=args.normalize_embeddings,
            project_only=args.project_only,
            embeddings_dir=args.embeddings_dir,
            text_field=args.text_field,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
            revision=args.revision,
            local_files_only=args.local_files_only,
            trust_remote_code=args.trust_remote_code,
        )
    except (LatentPrepError, DataFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    err = summary["reconstruction_error_val"]
    print(
        f"wrote {summary['n_train']} train + {summary['n_val']} val latents "
        f"({summary['source_dim']} -> {summary['latent_dim']} dims, "
        f"{100 * summary['explained_variance_total']:.1f}% of train variance kept) to {summary['output_dir']}\n"
        f"reconstruction error: {100 * (1 - summary['explained_variance_total']):.1f}% of the train variance, "
        + (f"{100 * err:.1f}% of the val variance" if err is not None else "no val split")
        + f"; latents {'whitened (unit variance per dim on train)' if summary['whiten'] else 'at PCA scale (--no_whiten)'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
