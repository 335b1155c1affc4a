"""sdcompress: compress and adapt Stable Diffusion checkpoints."""

__version__ = "0.1.0"
