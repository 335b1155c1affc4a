"""Names the resolver and the writers agree on, kept apart so that neither imports the other.

A diffusers folder written from a single file keeps the tensors that have no
diffusers home in `EXTRAS_FILE`, and reading it back restores them; a few of
those tensors are markers (`v_pred`, `ztsnr`...) that loaders read by name,
so the writers keep their dtype and the resolver never mistakes them for
U-Net weights.
"""

from __future__ import annotations

EXTRAS_FILE = "sdcompress_extras.safetensors"
MARKERS = ("v_pred", "ztsnr", "edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
