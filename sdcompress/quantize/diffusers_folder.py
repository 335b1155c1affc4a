"""`nf4` and `int8`: diffusers folders quantized by diffusers itself (bitsandbytes 4-bit, torchao int8).

These formats exist for diffusers users, so the quantization is diffusers' own: a
`PipelineQuantizationConfig` mapping each quantized component to its library's config
(diffusers' for the U-Net, transformers' for the text encoders), applied while
diffusers loads the pipeline, then `save_pretrained`, which records the config in
each component's `config.json` so `from_pretrained` quantizes nothing twice. Both
backends replace `nn.Linear` only: the U-Net's convolutions (two thirds of an SD 1.x
U-Net) stay at the source precision. Unlike the single-file formats this does not
stream: diffusers holds the whole pipeline in memory while it quantizes.

bitsandbytes' 4-bit path in diffusers refuses to run without a GPU, so `nf4` needs
CUDA; torchao's int8 weight-only path runs on a CPU (diffusers loads it in bf16).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sdcompress.choices import QuantFormat
from sdcompress.errors import SdcError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _backend(fmt: QuantFormat) -> None:
    """Fail in one sentence, before any work, when `fmt`'s library or hardware is missing."""
    import torch

    if fmt == QuantFormat.NF4:
        if not torch.cuda.is_available():
            raise SdcError(
                "nf4 needs a CUDA GPU (diffusers' bitsandbytes quantizer refuses to run without one); "
                "on a CPU use --format int8 or a gguf format."
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise SdcError(
                f"nf4 needs bitsandbytes ({e}); install it with: pip install 'sdcompress[nf4]'."
            ) from None
    else:
        try:
            import torchao  # noqa: F401
        except ImportError as e:
            raise SdcError(
                f"int8 needs torchao ({e}); install it with: pip install 'sdcompress[int8]'."
            ) from None


def _configs(fmt: QuantFormat, compute_dtype: Any) -> tuple[Any, Any]:
    """(diffusers config, transformers config) for `fmt`."""
    import diffusers
    import transformers

    if fmt == QuantFormat.NF4:
        kwargs = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
        return diffusers.BitsAndBytesConfig(**kwargs), transformers.BitsAndBytesConfig(**kwargs)
    from torchao.quantization import Int8WeightOnlyConfig

    return (
        diffusers.TorchAoConfig(Int8WeightOnlyConfig()),
        transformers.TorchAoConfig(Int8WeightOnlyConfig()),
    )


def _diffusers_source(model: Any, scratch: Path) -> Path:
    """A diffusers folder holding `model`: its own folder when it is one, else written by our writer."""
    from sdcompress.checkpoint.writers import save_diffusers

    marker = "config.json" if model.unet_only else "model_index.json"
    if model.format == "diffusers" and model.path is not None and (Path(model.path) / marker).is_file():
        return Path(model.path)
    folder = scratch / "source"
    save_diffusers(model, folder)
    return folder


def quantize_folder(
    model_ref: str, out_dir: Path, fmt: QuantFormat, *, text_encoders: bool, allow_pickle: bool = False
) -> None:
    """Write `model_ref` to `out_dir` as a diffusers folder whose U-Net (and, with `text_encoders`,
    text encoders) diffusers quantized to `fmt`; the VAE and everything else keep the source precision.

    `out_dir` is filled as given (the caller moves it into place); a source that is not a diffusers
    folder is first written as one into a scratch folder beside it, removed on return.
    """
    import torch

    from sdcompress.checkpoint.resolve import load_model

    fmt = QuantFormat.parse(fmt, "--format")
    if not fmt.is_diffusers:
        raise SdcError(f"--format {fmt} is not a diffusers-folder format (nf4, int8).")
    _backend(fmt)
    model = load_model(model_ref, allow_pickle=allow_pickle)
    quantized = ["unet"] + ([c for c in TEXT_ENCODERS if c in model.components] if text_encoders else [])
    if text_encoders and len(quantized) == 1:
        raise SdcError(f"{model_ref} has no text encoders to quantize; drop --text-encoders.")
    unet_dtype = next(iter(model.components["unet"].values())).dtype
    dtype = unet_dtype if unet_dtype in (torch.float16, torch.bfloat16) else torch.float32
    # torchao's int8 layers run in bf16 only (diffusers casts them and says so); the rest keeps `dtype`
    qdtype = torch.bfloat16 if fmt == QuantFormat.INT8 else dtype
    for_diffusers, for_transformers = _configs(fmt, qdtype)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".quantize-source-") as scratch:
        source = _diffusers_source(model, Path(scratch))
        if model.unet_only:
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(
                source, quantization_config=for_diffusers, torch_dtype=qdtype
            )
            unet.save_pretrained(out_dir)
            return
        from diffusers import DiffusionPipeline, PipelineQuantizationConfig

        mapping = {c: for_diffusers if c == "unet" else for_transformers for c in quantized}
        pipe = DiffusionPipeline.from_pretrained(
            source,
            quantization_config=PipelineQuantizationConfig(quant_mapping=mapping),
            torch_dtype={"default": dtype, **{c: qdtype for c in quantized}},
        )
        pipe.save_pretrained(out_dir)
