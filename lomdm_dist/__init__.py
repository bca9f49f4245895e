"""lomdm_dist: distributed training of masked diffusion language models with learned generation order."""

__version__ = "0.1.0"
