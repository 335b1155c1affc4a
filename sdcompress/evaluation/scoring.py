"""Scoring every rendered model: agreement with the teacher, CLIP score, FID.

Cached images are read back in chunks, so 30K prompts need no more memory
than one chunk of images per model. Metrics whose networks are not needed are
never loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from sdcompress.choices import EvalMetric
from sdcompress.evaluation.agreement import Agreement, latent_mse, psnr, ssim, to_unit
from sdcompress.evaluation.generation_cache import ModelCache

CHUNK = 64


def _chunks(pairs: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    return [pairs[i : i + CHUNK] for i in range(0, len(pairs), CHUNK)]


def agreement_of(student: ModelCache, teacher: ModelCache, pairs: list[tuple[str, int]]) -> Agreement:
    """Latent MSE, PSNR and SSIM against the teacher's images of the same prompts and seeds."""
    mse, p, s = [], [], []
    for chunk in _chunks(pairs):
        sl, si = student.stack(chunk)
        tl, ti = teacher.stack(chunk)
        if si.shape != ti.shape or sl.shape != tl.shape:
            from sdcompress.errors import SdcError

            raise SdcError(
                f"{student.label} renders {tuple(si.shape[-2:])} px but the teacher {tuple(ti.shape[-2:])} px; "
                "give --resolution so both render the same size."
            )
        mse.append(latent_mse(sl, tl))
        a, b = to_unit(si), to_unit(ti)
        p.append(psnr(a, b))
        s.append(ssim(a, b))
    return Agreement(
        latent_mse=float(torch.cat(mse).mean()),
        psnr=float(torch.cat(p).mean()),
        ssim=float(torch.cat(s).mean()),
        pairs=len(pairs),
    )


def score_all(
    request: Any, evals: list[Any], caches: list[ModelCache], pairs: list[tuple[str, int]], device, report
) -> list[str]:
    """Fill each `ModelEval`'s metrics in place; returns notes for the user."""
    notes: list[str] = []
    if EvalMetric.AGREEMENT in request.metrics:
        teacher = caches[0]
        for e, cache in zip(evals, caches, strict=True):
            report(f"{e.ref}: agreement with the teacher")
            e.agreement = agreement_of(cache, teacher, pairs).to_dict()
    if EvalMetric.CLIP in request.metrics:
        from sdcompress.evaluation.clip_score import ClipScorer

        report(f"loading CLIP {request.clip_model}")
        scorer = ClipScorer.load(request.clip_model, device)
        for e, cache in zip(evals, caches, strict=True):
            report(f"{e.ref}: CLIP score")
            total = 0.0
            for chunk in _chunks(pairs):
                _, images = cache.stack(chunk)
                total += float(scorer.scores(images, [p for p, _ in chunk]).sum())
            e.clip_score = total / len(pairs)
    if EvalMetric.FID in request.metrics:
        from sdcompress.evaluation.fid import (
            InceptionFeatures,
            frechet_distance,
            open_images,
            reference_images,
        )

        report(f"loading FID network {request.fid_model}")
        network = InceptionFeatures.load(request.fid_model, device, request.fid_resolution)
        files = reference_images(request.fid_reference)
        report(f"FID reference: {len(files)} images")
        reference = network.stats_of(open_images(files))
        for e, cache in zip(evals, caches, strict=True):
            report(f"{e.ref}: FID")
            stats = network.stats_of(open_images([cache.image_path(*pair) for pair in pairs]))
            e.fid = frechet_distance(stats, reference)
        if len(pairs) < 2048 or len(files) < 2048:
            notes.append(
                f"FID from {len(pairs)} generated and {len(files)} reference images: below 2048 (the feature "
                "width) the covariances are rank-deficient and FID is biased upwards; compare only like with like."
            )
    return notes
