"""Training entry point: ``python -m rwkv_diffusion_rnn.train_rwkv [hydra overrides]``.

Also runnable as ``python rwkv_diffusion_rnn/train_rwkv.py --config-name rwkv_mmdit ...``.
Configs live in ``configs/`` (primary: ``rwkv_mmdit.yaml``). Writes ``train_log.jsonl``,
``metrics.json`` and checkpoints under ``logging.save_dir`` (default: Hydra's output dir).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python rwkv_diffusion_rnn/train_rwkv.py
    # Import the package from the checkout, and keep the package's own folder off sys.path so
    # its modules (tasks, sampling, ...) cannot shadow top-level ones.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]
    sys.path.insert(0, str(Path(_here).parent))

import hydra
from omegaconf import DictConfig

from rwkv_diffusion_rnn.training.config_validation import CONFIG_DIR  # noqa: E402


def compose_config(overrides=()) -> DictConfig:
    """The config the command line builds from these Hydra overrides (for use from Python)."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="rwkv_mmdit", overrides=list(overrides))


def run(cfg: DictConfig) -> dict:
    """Trains with a composed config and returns the final metrics."""
    from rwkv_diffusion_rnn.training.improved_trainer import Trainer
    trainer = Trainer(cfg)
    dist = trainer.dist
    try:
        if trainer.dist.main:
            n_params = sum(p.numel() for p in trainer.model.parameters())
            n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            ranks = (f"  {trainer.dist.world} processes, training.parallel={trainer.dist.mode}"
                     if trainer.dist.active else "")
            print(f"save_dir: {trainer.save_dir}  params: {n_params:,} (trainable {n_train:,}){ranks}")
        return trainer.train()
    finally:
        # The model goes before the process group, while the interpreter is whole: gloo's worker
        # threads may still hold FSDP's last collectives, and freeing those at interpreter exit aborts.
        del trainer
        gc.collect()
        dist.close()


@hydra.main(config_path=CONFIG_DIR, config_name="rwkv_mmdit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rwkv_diffusion_rnn.common.errors import OtherRankFailed, ProjectError, TrainingDiverged
    from rwkv_diffusion_rnn.training.distributed import launched
    main_rank = (launched() or (0,))[0] == 0     # under torchrun, rank 0 alone speaks
    try:
        metrics = run(cfg)
    except OtherRankFailed:
        sys.exit(2)
    except TrainingDiverged as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except (ProjectError, OSError) as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not main_rank:
        return
    print("final metrics: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in metrics.items()))


if __name__ == "__main__":
    main()
