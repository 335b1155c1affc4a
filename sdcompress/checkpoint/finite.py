"""Refuse NaN and inf values as tensors stream through a job, naming the tensor.

One NaN in one LoRA factor turns a whole row of the merged weight into NaN,
and an fp16 cast of a too-large sum writes inf; either makes a model that
renders black with exit 0. The check is `torch.isfinite(t).all()` on a tensor
that is already in memory, so it costs one pass over values the job computes
anyway. Tensors copied byte for byte from an input (`raw`) are not loaded and
not checked: they are the input, unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.checkpoint.writers import cast, component_dtype
from sdcompress.errors import SdcError

HINT = "pass --allow-nonfinite to keep such values"


def nonfinite_kind(t: torch.Tensor) -> str | None:
    """'NaN', 'inf' or None; integer tensors are always finite."""
    if not (t.dtype.is_floating_point or t.dtype.is_complex) or bool(torch.isfinite(t).all()):
        return None
    return "NaN" if bool(torch.isnan(t).any()) else "inf"


def check_finite(t: torch.Tensor, what: str, why: str = "") -> torch.Tensor:
    """`t` unchanged, or an `SdcError` saying that `what` holds NaN/inf (`why`: a likely cause)."""
    kind = nonfinite_kind(t)
    if kind is not None:
        raise SdcError(f"{what} holds {kind} values{why}; {HINT}.")
    return t


def overflow_note(dtype: torch.dtype) -> str:
    """The likely cause of an inf in a tensor of `dtype`, for the error message."""
    return " (fp16 holds at most 65504: an overflow?)" if dtype == torch.float16 else ""


def finite_checked(lt: LazyTensor, what: str, why: str = "") -> LazyTensor:
    """`lt` whose loader checks its values (the result is no longer a raw byte copy)."""
    if not lt.dtype.is_floating_point:
        return lt
    return LazyTensor(lt.shape, lt.dtype, lambda: check_finite(lt.load(), what, why))


def finite_state_dict(sd: StateDict, label: str) -> StateDict:
    """Every computed tensor of `sd` checked as it loads (raw copies left alone); `label` prefixes names."""
    out: StateDict = {}
    for k, v in sd.items():
        what = f"the output tensor {label}{k}"
        out[k] = v if v.raw is not None else finite_checked(v, what, overflow_note(v.dtype))
    return out


def finite_model(model: Model, dtype: torch.dtype | None, vae_dtype: torch.dtype | None = None) -> Model:
    """`model` cast as the writers cast it, each computed tensor checked for NaN/inf as it streams.

    The cast is the writers' own (`cast`, `component_dtype`), done here so the
    check sees the values as written (an fp16 overflow is inf only after the
    cast); the writers' cast is then a no-op.
    """
    components = {
        c: finite_state_dict(cast(sd, component_dtype(model, c, dtype, vae_dtype)), f"{c}.")
        for c, sd in model.components.items()
    }
    return dataclasses.replace(model, components=components)
