"""Stable Diffusion as a Cog model: everything that is not the Cog surface (predict.py)."""

__version__ = "0.1.0"
