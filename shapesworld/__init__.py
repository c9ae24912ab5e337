"""Shapes world: a tiny text-to-image diffusion model trained on synthetic shapes."""
