"""Model definitions: the RWKV-7 backbone, bidirectional mixers and the diffusion denoiser."""
