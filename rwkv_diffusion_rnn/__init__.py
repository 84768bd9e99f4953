"""rwkv_diffusion_rnn: diffusion language models with an RWKV-7 recurrent denoiser."""

__version__ = "0.1.0"
