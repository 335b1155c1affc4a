"""`merge`: bake LoRAs into checkpoints, combine LoRAs, and merge checkpoints, tensor by tensor.

Every output tensor is a `LazyTensor` whose loader computes the merged value
from the inputs' memory-mapped tensors, and the project's writers stream them
to disk one at a time, so memory stays near one tensor per input whatever the
model size.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcompress.arch.families import get_family
from sdcompress.checkpoint.atomic import Overwrite, check_output
from sdcompress.checkpoint.embedding_files import Embedding, bake_embedding, read_embedding
from sdcompress.checkpoint.finite import check_finite, finite_model, nonfinite_kind, overflow_note
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.resolve import load_model
from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.checkpoint.writers import save_diffusers, save_single_file
from sdcompress.choices import LoraFormat, ModelFormat, output_kind, parse_choices
from sdcompress.choices import MergeMethod as MethodName
from sdcompress.errors import SdcError
from sdcompress.lowrank.block_weights import BlockWeights
from sdcompress.lowrank.extract import check_same_architecture
from sdcompress.lowrank.layouts import (
    KOHYA,
    Adapter,
    LoraFile,
    LoraModule,
    derived_metadata,
    read_lora,
    resolve,
    shape_factors,
    write_lora,
)
from sdcompress.lowrank.merge_math import get_method, lora_delta
from sdcompress.lowrank.svd import low_rank
from sdcompress.lowrank.targets import Naming, Target, naming_for

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LoraRef:
    path: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraRef:
        """'file.safetensors[:WEIGHT]'; a colon not followed by a number stays part of the path."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(head, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)


@dataclass
class MergeRequest:
    models: list[str]
    output: str
    loras: list[LoraRef] = field(default_factory=list)
    # Checkpoint merges (two or more models); each method takes only the options it declares.
    method: MethodName | None = None  # default: weighted-sum for two models, add-difference for three
    alpha: float | None = None
    block_weights: BlockWeights | None = None  # per-block alpha overriding `alpha`
    density: float | None = None
    seed: int | None = None  # dare's random drop (default 0)
    # LoRA + LoRA (no models)
    rank: int | None = None  # re-rank to this by SVD of the summed delta
    format: LoraFormat | None = None  # default kohya
    dtype: torch.dtype | None = None
    overwrite: bool | Overwrite = False
    allow_pickle: bool = False
    allow_nonfinite: bool = False  # write NaN/inf instead of refusing them
    device: str = "cpu"
    embeddings: list[str] = field(default_factory=list)  # textual inversions baked in as new tokens

    def __post_init__(self) -> None:
        parse_choices(self)
        self.check_options()

    def job(self) -> str:
        if len(self.models) >= 2:
            return "merging checkpoints"
        return "baking LoRAs into one model" if self.models else "merging LoRA files"

    def check_options(self) -> None:
        """Options this kind of merge has no use for are an error, never silently ignored."""
        checkpoints, loras_only = len(self.models) >= 2, not self.models
        for flags, home, wrong in (
            (
                {"--method": self.method, "--alpha": self.alpha, "--block-weights": self.block_weights,
                 "--density": self.density, "--seed": self.seed},
                "merging two or more models",
                not checkpoints,
            ),
            ({"--rank": self.rank, "--format": self.format}, "merging LoRA files alone", not loras_only),
        ):  # fmt: skip
            given = [flag for flag, value in flags.items() if value is not None]
            if given and wrong:
                one = len(given) == 1
                names = given[0] if one else f"{', '.join(given[:-1])} and {given[-1]}"
                raise SdcError(
                    f"{names} only {'applies' if one else 'apply'} when {home}, not when {self.job()}; "
                    f"drop {'it' if one else 'them'}."
                )


@dataclass
class MergeResult:
    output: str
    kind: str  # "bake" | "checkpoint" | "lora"
    tensors: int
    adapted_modules: int
    notes: list[str] = field(default_factory=list)


# ----- LoRA into a checkpoint ---------------------------------------------------------------------


def _check_family(lora: LoraFile, model: Model) -> None:
    says = lora.looks_sdxl()
    if says is not None and says != model.family.is_sdxl:
        what = "SDXL" if says else "SD 1/2"
        raise SdcError(
            f"{lora.path} is a LoRA for {what} but {model.ref} is {model.family.title}; "
            "use a LoRA made for this model family."
        )


def _check_fits(lora: LoraFile, adapter: Adapter, target: Target, model: Model) -> None:
    """Every kind (LoRA, LoHa, LoKr, full diff, norm) must make an update of the target's shape."""
    sd = model.components[target.component]
    w = sd[target.weight_key]
    want = adapter.flat_shape()
    have = (w.shape[0], math.prod(w.shape[1:]))
    bias = adapter.bias_shape()
    bias_key = target.path + ".bias"
    if want is not None and want != have:
        made, of = f"a {want[0]}x{want[1]}", list(w.shape)
    elif bias is not None and bias_key in sd and math.prod(bias) != math.prod(sd[bias_key].shape):
        made, of = f"a {list(bias)} bias", list(sd[bias_key].shape)
    else:
        return
    raise SdcError(
        f"{lora.path} does not fit {model.ref}: {adapter.name} makes {made} update for a {of} "
        "weight; use a LoRA made for this model family."
    )


def bake_loras(model: Model, loras: list[tuple[LoraFile, float]]) -> tuple[Model, int]:
    """The model with each LoRA applied at its weight (added, or weight-decomposed for DoRA); lazy."""
    naming = naming_for(model)
    updates: dict[tuple[str, str], list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for lora, weight in loras:
        _check_family(lora, model)
        for target, adapter in resolve(lora, naming).items():
            _check_fits(lora, adapter, target, model)
            if adapter.flat_shape() is not None:
                updates.setdefault((target.component, target.weight_key), []).append(
                    lambda w, a=adapter, s=weight: a.apply(w, s)
                )
            bias_key = target.path + ".bias"
            if adapter.bias_shape() is not None and bias_key in model.components[target.component]:
                updates.setdefault((target.component, bias_key), []).append(
                    lambda w, a=adapter, s=weight: w + a.bias_delta().reshape(w.shape) * s
                )
    components = {c: dict(sd) for c, sd in model.components.items()}
    for (component, key), deltas in updates.items():
        components[component][key] = _plus(components[component][key], deltas)
    return dataclasses.replace(model, components=components), len(updates)


def _plus(w: LazyTensor, updates: list[Callable[[torch.Tensor], torch.Tensor]]) -> LazyTensor:
    """`w` with each update applied in order (fp32), in its own dtype; a DoRA needs the weight it rescales."""

    def load() -> torch.Tensor:
        out = w.load().float()
        for update in updates:
            out = update(out)
        return out.to(w.dtype)

    return LazyTensor(w.shape, w.dtype, load)


# ----- checkpoint merges --------------------------------------------------------------------------


def merge_models(
    models: list[Model],
    method: str,
    *,
    alpha: float | None,
    density: float | None,
    seed: int | None,
    block_weights: BlockWeights | None = None,
) -> Model:
    """Tensor-by-tensor merge of same-architecture models; the first model's configs and dtypes.

    With `block_weights`, a tensor in a named block is merged with that block's
    alpha instead of `alpha` (see `sdcompress.lowrank.block_weights`).
    """
    m = get_method(method)
    m.check_params({"alpha": alpha, "density": density, "seed": seed})
    lo, hi = m.n_models
    if not lo <= len(models) <= hi:
        raise SdcError(
            f"--method {method} merges {lo if lo == hi else f'{lo} to {hi}'} models, got {len(models)}."
        )
    first = models[0]
    for other in models[1:]:
        if other.family.topology != first.family.topology:
            raise SdcError(
                f"{first.ref} is {first.family.title} and {other.ref} is {other.family.title}; "
                "merge models of the same family."
            )
        check_same_architecture(first.components, other.components, list(first.components))
    if block_weights is not None:
        block_weights.check_covers(first.components)
    kwargs: dict[str, float] = {}
    if alpha is not None:
        kwargs["alpha"] = alpha
    if density is not None:
        kwargs["density"] = density
    components: dict[str, StateDict] = {}
    index = 0
    for c, sd in first.components.items():
        out: StateDict = {}
        for key, lt in sd.items():
            parts = [mm.components[c][key] for mm in models]
            if not lt.dtype.is_floating_point:
                out[key] = lt
                continue
            key_kwargs = (
                {**kwargs, "seed": seed or 0, "key_index": index} if "seed" in m.params else dict(kwargs)
            )
            block_alpha = block_weights.alpha_for(c, key) if block_weights else None
            if block_alpha is not None:
                key_kwargs["alpha"] = block_alpha
            out[key] = _merged(parts, m.fn, key_kwargs)
            index += 1
        components[c] = out
    return dataclasses.replace(first, components=components)


def _merged(parts: list[LazyTensor], fn: Callable[..., torch.Tensor], kwargs: dict) -> LazyTensor:
    first = parts[0]

    def load() -> torch.Tensor:
        return fn([p.load().float() for p in parts], **kwargs).to(first.dtype)

    return LazyTensor(first.shape, first.dtype, load)


def write_model(
    model: Model,
    output: str,
    *,
    dtype: torch.dtype | None,
    overwrite: bool | Overwrite,
    progress: Progress | None = None,
    allow_nonfinite: bool = False,
) -> list[str]:
    """`.safetensors` -> one single file; anything else -> a diffusers folder."""
    if not allow_nonfinite:
        model = finite_model(model, dtype)
    total = sum(len(sd) for sd in model.components.values())
    done = [0]

    def on_tensor(name: str, _: LazyTensor) -> None:
        done[0] += 1
        if progress:
            progress(name, min(done[0], total), total)

    if output_kind(output) == ModelFormat.SINGLE_FILE:
        return save_single_file(model, output, dtype=dtype, overwrite=overwrite, on_tensor=on_tensor)
    return save_diffusers(model, output, dtype=dtype, overwrite=overwrite, on_tensor=on_tensor)


# ----- LoRA + LoRA --------------------------------------------------------------------------------


def skeleton_naming(sdxl: bool) -> Naming:
    """Module names of a full-size SD 1 or SDXL pipeline (meta device), for LoRAs merged without a model."""
    from sdcompress.checkpoint.instantiate import module_from_config

    fam = get_family("sdxl" if sdxl else "sd1")
    keys = {"unet": list(module_from_config("unet", fam.unet).state_dict())}
    for spec in fam.text_encoders:
        keys[spec.component] = list(module_from_config(spec.component, spec.config).state_dict())
    return Naming(keys, sdxl=sdxl)


def _factors(a: Adapter, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat [out, r] / [r, in*k*k] factors with scale and weight folded into up."""
    if a.label != "LoRA":
        raise SdcError(
            f"module {a.name} is a LyCORIS {a.label} update; "
            "merging it with other LoRAs needs a base model: bake it into a checkpoint instead."
        )
    up = a.tensors["up"].load().float()
    down = a.tensors["down"].load().float()
    r = down.shape[0]
    scale = (a.alpha / r if a.alpha is not None and r else 1.0) * weight
    return up.reshape(up.shape[0], r) * scale, down.reshape(r, -1)


def merge_lora_files(
    loras: list[tuple[LoraFile, float]], rank: int | None, *, out_dtype: torch.dtype | None = None
) -> tuple[list[LoraModule], Naming]:
    """Sum LoRAs exactly by concatenating ranks, or re-rank each module's summed delta by SVD."""
    flags = {lf.looks_sdxl() for lf, _ in loras} - {None}
    if len(flags) > 1:
        raise SdcError(
            "the LoRAs are for different model families (SD 1/2 and SDXL); merge LoRAs of one family."
        )
    naming = skeleton_naming(bool(flags and flags.pop()))
    per_target: dict[Target, list[tuple[Adapter, float]]] = {}
    for lora, weight in loras:
        for target, adapter in resolve(lora, naming).items():
            per_target.setdefault(target, []).append((adapter, weight))
    modules = []
    for target, items in sorted(per_target.items()):
        factors = [_factors(a, w) for a, w in items]
        down_shape = items[0][0].tensors["down"].shape
        weight_shape = (factors[0][0].shape[0], *down_shape[1:])
        if any(
            f[1].shape[1] != factors[0][1].shape[1] or f[0].shape[0] != factors[0][0].shape[0]
            for f in factors
        ):
            raise SdcError(
                f"LoRAs disagree on the shape of {target.component}.{target.path}; merge LoRAs of one model."
            )
        up = torch.cat([f[0] for f in factors], dim=1)
        down = torch.cat([f[1] for f in factors], dim=0)
        if rank is not None:
            delta = lora_delta(up, down, 1.0)
            kind = nonfinite_kind(delta)
            if kind is not None:  # only with --allow-nonfinite: the inputs are checked as they load
                raise SdcError(
                    f"cannot re-rank {target.component}.{target.path}: its summed update holds {kind} "
                    "values, which SVD cannot decompose; drop --rank to keep the exact sum."
                )
            lr = low_rank(delta, rank)
            up, down = lr.up, lr.down
        up, down = shape_factors(up, down, weight_shape)
        if out_dtype is not None:
            name = naming.kohya(target)
            for part, t in (("lora_up", up), ("lora_down", down)):
                check_finite(
                    t.to(out_dtype), f"the output tensor {name}.{part}.weight", overflow_note(out_dtype)
                )
        modules.append(LoraModule(target, up.contiguous(), down.contiguous(), float(down.shape[0])))
    return modules, naming


# ----- the job -----------------------------------------------------------------------------------


def _read_lora(path: str, allow_nonfinite: bool) -> LoraFile:
    """The LoRA at `path`; an A1111 hypernetwork is refused in one sentence (it has no weights to bake)."""
    from sdcompress.training.hypernetwork import is_hypernetwork_file

    if is_hypernetwork_file(path):
        raise SdcError(
            f"{path} is a hypernetwork, which transforms attention inputs while the model runs and cannot "
            "be baked into its weights; load it beside the model in A1111 or ComfyUI instead."
        )
    return read_lora(path, allow_nonfinite=allow_nonfinite)


def run_merge(request: MergeRequest, progress: Progress | None = None) -> MergeResult:
    inputs = [*request.models, *(ref.path for ref in request.loras), *request.embeddings]
    kind = "file" if Path(request.output).suffix == ".safetensors" else "dir"
    check_output(request.output, overwrite=request.overwrite, inputs=inputs, kind=kind)
    embeddings = _embedding_inputs(request, kind)
    loras = [(_read_lora(ref.path, request.allow_nonfinite), ref.weight) for ref in request.loras]
    if not request.models:
        if not loras:
            raise SdcError("nothing to merge; give models and/or --lora files.")
        if Path(request.output).suffix != ".safetensors":
            raise SdcError(
                f"{request.output} must end in .safetensors; a merged LoRA is one safetensors file."
            )
        if request.rank is not None and request.rank < 1:
            raise SdcError(f"--rank must be at least 1, got {request.rank}.")
        dtype = request.dtype or torch.float16
        modules, naming = merge_lora_files(
            loras, request.rank, out_dtype=None if request.allow_nonfinite else dtype
        )
        # the family keys (A1111 hides an SDXL LoRA labelled SD 1 on SDXL) are kept, as kohya's resize does
        meta = derived_metadata(
            [lora.metadata for lora, _ in loras],
            title=Path(request.output).stem,
            family=get_family("sdxl" if naming.sdxl else "sd1"),
        )
        meta["sdcompress.merged_from"] = ", ".join(r.path for r in request.loras)
        write_lora(request.output, modules, naming, fmt=request.format or KOHYA, dtype=dtype, metadata=meta,
                   overwrite=request.overwrite)  # fmt: skip
        return MergeResult(request.output, "lora", 3 * len(modules), len(modules))
    models = [load_model(m, allow_pickle=request.allow_pickle) for m in request.models]
    notes: list[str] = []
    if len(models) > 1:
        method = request.method or ("add-difference" if len(models) == 3 else "weighted-sum")
        merged = merge_models(
            models,
            method,
            alpha=request.alpha,
            density=request.density,
            seed=request.seed,
            block_weights=request.block_weights,
        )
        kind = "checkpoint"
        notes.append(f"{method} of {len(models)} models")
        if request.block_weights is not None:
            notes.append(f"block weights {request.block_weights.describe()} (elsewhere --alpha)")
    else:
        if not loras and not embeddings:
            raise SdcError("one model and no --lora: nothing to merge; add --lora FILE or a second model.")
        merged, kind = models[0], "bake"
    adapted = 0
    if loras:
        from sdcompress.quantize.describe import check_not_quantized

        for m in models:  # a delta added to fp8 codes vanishes in rounding
            check_not_quantized(m, "bake the LoRA into the full-precision model first, then quantize it.")
        merged, adapted = bake_loras(merged, loras)
        notes.append(f"baked {len(loras)} LoRA(s) into {adapted} tensors")
    with tempfile.TemporaryDirectory(prefix="sdcompress-tokenizers-") as workdir:
        for index, emb in enumerate(embeddings):
            merged = bake_embedding(merged, emb, Path(workdir) / str(index))
            notes.append(f"baked embedding {emb.token} ({emb.count} vectors) as new tokens")
        total = sum(len(sd) for sd in merged.components.values())
        notes += write_model(
            merged,
            request.output,
            dtype=request.dtype,
            overwrite=request.overwrite,
            progress=progress,
            allow_nonfinite=request.allow_nonfinite,
        )
    return MergeResult(request.output, kind, total, adapted, notes)


def _embedding_inputs(request: MergeRequest, kind: str) -> list[Embedding]:
    """The --embedding files, read; refused without a model or for a single-file output."""
    if not request.embeddings:
        return []
    if not request.models:
        raise SdcError("--embedding needs a model to bake the token into; give the model first.")
    if kind == "file":
        raise SdcError(
            f"{request.output} is a single file, which cannot carry the extended tokenizer a baked token needs "
            "(A1111, ComfyUI and from_single_file rebuild the standard vocabulary); write a diffusers folder "
            "instead, or load the embedding file beside the checkpoint."
        )
    return [read_embedding(path) for path in request.embeddings]
