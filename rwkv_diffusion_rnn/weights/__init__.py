"""Pretrained RWKV-7 weights: BlinkDL .pth, fla/HF safetensors, Hub download."""
