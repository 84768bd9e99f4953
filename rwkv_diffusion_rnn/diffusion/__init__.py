"""Masked text diffusion, Gaussian latent diffusion, sampling; knows no trainer."""
