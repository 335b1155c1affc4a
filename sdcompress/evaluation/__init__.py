"""Measuring what compression cost: teacher agreement, CLIP score, FID, and the pictures to look at.

`generation_cache` renders and stores images per (model fingerprint, prompt,
seed, settings); `agreement`, `clip_score` and `fid` score them; `grid` and
`plot` draw them. `services.eval` puts the pieces together.
"""
