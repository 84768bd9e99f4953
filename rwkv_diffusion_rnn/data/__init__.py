"""Tokenizers, the text + latent dataset, the synthetic tasks, the demo grammar."""
