"""Training: a plain PyTorch loop (loop.py) and its Ray Train wiring (ray_train.py)."""
