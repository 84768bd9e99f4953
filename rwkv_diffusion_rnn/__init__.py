"""rwkv_diffusion_rnn: diffusion language models with an RWKV-7 recurrent denoiser.

The public API is importable from here (each name is loaded on first use, so importing the
package alone stays light)::

    from rwkv_diffusion_rnn import load_rwkv7, wkv7, MultimodalRWKVDenoiser, DenoiserConfig
    from rwkv_diffusion_rnn import build_denoiser, generate_text, generate_latent
    from rwkv_diffusion_rnn.generate import generate        # the generate command as a function
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "wkv7": "rwkv_diffusion_rnn.ops.wkv7",
    "RWKV7": "rwkv_diffusion_rnn.models.rwkv7",
    "RWKV7Config": "rwkv_diffusion_rnn.models.rwkv7",
    "MultimodalRWKVDenoiser": "rwkv_diffusion_rnn.models.rwkv_denoiser",
    "DenoiserConfig": "rwkv_diffusion_rnn.models.rwkv_denoiser",
    "load_rwkv7": "rwkv_diffusion_rnn.weights.pretrained_rwkv",
    "build_denoiser": "rwkv_diffusion_rnn.weights.pretrained_rwkv",
    "generate_text": "rwkv_diffusion_rnn.diffusion.sampling",
    "generate_latent": "rwkv_diffusion_rnn.diffusion.sampling",
    "generate_joint": "rwkv_diffusion_rnn.diffusion.sampling",
    "generate_autoregressive": "rwkv_diffusion_rnn.diffusion.sampling",
    "fill_masks": "rwkv_diffusion_rnn.diffusion.sampling",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'rwkv_diffusion_rnn' has no attribute {name!r}")
