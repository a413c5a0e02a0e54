"""The MoCo v2 views, both ways of making them from the `augment:` section: one PIL image at a
time in DataLoader workers (per_image.py), or a whole batch at once on the training device
(batched.py) from its parts: crops (crops.py), colour jitter and grayscale (colour.py), the
Gaussian blur both paths share (blur.py) and the per-sample random numbers (sample_rng.py)."""
