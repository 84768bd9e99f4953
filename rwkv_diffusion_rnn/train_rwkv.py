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
    from rwkv_diffusion_rnn.training.resume import take_init_config
    from rwkv_diffusion_rnn.training.llada_names import translate_train
    overrides = translate_train(overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="rwkv_mmdit", overrides=list(overrides))
    take_init_config(cfg, overrides)        # training.init_from: the checkpoint's model and tokenizer
    return cfg


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
        from hydra.core.hydra_config import HydraConfig
        from rwkv_diffusion_rnn.training.resume import take_init_config
        take_init_config(cfg, HydraConfig.get().overrides.task)
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


def usage() -> str:
    """``--help``: what the command does, its config groups and main keys (the choices read from
    the config folder and the registries), and examples. Hydra's full config: ``--cfg job``."""
    from rwkv_diffusion_rnn.data.sources import DATA_SOURCES
    from rwkv_diffusion_rnn.models.mixers import MIXERS
    from rwkv_diffusion_rnn.models.rwkv_denoiser import ARCHS

    def group(name):
        return " | ".join(sorted(p.stem for p in (Path(CONFIG_DIR) / name).glob("*.yaml")))

    return f"""usage: python -m rwkv_diffusion_rnn.train_rwkv [key=value ...] [group=choice ...]

Trains a diffusion language model whose denoiser is an RWKV-7 network (text + sentence latent,
or text alone), or its AR baseline. Writes train_log.jsonl, metrics.json and checkpoints under
logging.save_dir (default runs/<date>/<time>). Overrides are Hydra's: key=value.

config groups (group=choice)
  experiment     {group("experiment")}
  model          {group("model")}
  data           {group("data")}
  text_noise     {group("text_noise")}
  latent_noise   {group("latent_noise")}
  optimizer      {group("optimizer")}

main keys
  model.arch               {" | ".join(ARCHS)}
  model.mixer              {" | ".join(sorted(MIXERS))}   (how the blocks read the sequence)
  model.rwkv_name          pretrained RWKV-7 weights: a .pth / safetensors path or Hub repo (null: from scratch)
  model.n_layer / n_embd / head_size    sizes of a network built from scratch
  model.latent_prefix_len  latent prefix tokens (0: a text-only model)
  data.kind                {" | ".join(DATA_SOURCES)}   (set by the data group)
  data.path / data.seq_len the corpus (data=text, data=sft) and the text length
  tokenizer.name           chars | bytes | BlinkDL/rwkv7-g1 | a Hugging Face tokenizer
  training.objective       diffusion | ar | embedding
  training.max_steps / num_epochs / train_batch_size / dtype / device
  training.resume          latest | <checkpoint dir>   (continue exactly)
  training.init_from       <checkpoint dir>   (a new run from its weights)
  logging.save_dir / log_freq / eval_freq / save_every

examples
  python -m rwkv_diffusion_rnn.train_rwkv experiment=shakespeare_char training.max_steps=200 logging.save_dir=runs/shk
  python -m rwkv_diffusion_rnn.train_rwkv experiment=struct training.max_steps=100 logging.save_dir=runs/struct
  python -m rwkv_diffusion_rnn.train_rwkv logging.save_dir=runs/struct training.resume=latest training.max_steps=200

every key and its default: python -m rwkv_diffusion_rnn.train_rwkv --cfg job
Hydra's own options: --hydra-help"""


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(usage())
        sys.exit(0)
    from rwkv_diffusion_rnn.common.errors import ConfigError
    from rwkv_diffusion_rnn.training.llada_names import translate_train
    try:
        sys.argv[1:] = translate_train(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
