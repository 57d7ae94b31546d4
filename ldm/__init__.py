"""Latent diffusion training framework."""
