"""Training: the loop, optimizer, EMA, checkpoints and metrics. ``python -m lomdm_dist.train CONFIG``."""
