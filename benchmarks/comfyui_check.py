"""ComfyUI's own loader on our fp8 and scaled-fp8 files: detected model type and U-Net output.

    python benchmarks/comfyui_check.py --comfyui /path/to/ComfyUI --family sd1 --family sdxl

ComfyUI is not a dependency (and not installable in the CI venv), so this is a script, run
by hand, whose output is recorded in docs/quantize.md. For each family it takes the cached
full-size random-weight fp16 single file (sdcompress.testing; tiny models are not detected
by ComfyUI), writes `fp8` and `fp8-scaled` with `sdcompress quantize`, then:

- loads each file with ComfyUI's `comfy.sd.load_diffusion_model` (its detection, its
  scaled-fp8 handling, its ops) and prints the model class it detected;
- runs ComfyUI's U-Net and ours (the file read back by sdcompress, fp8 codes cast up and
  scales multiplied out, in a diffusers U-Net) on the same fixed inputs, and prints the
  relative difference of their outputs.

ComfyUI imports torchvision/torchaudio/av/... at module level for models unrelated to SD; where
those are not installed they are replaced by empty modules (nothing of theirs runs here).
`torchsde` must be importable (pip install --target DIR torchsde trampoline; add DIR to
PYTHONPATH).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch

UNRELATED = ("torchvision", "torchaudio", "av", "kornia", "spandrel", "sentencepiece")


class _Empty(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name: str):  # noqa: ANN204 - anything a module-level import asks for
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class _EmptyFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return _Empty(spec.name)

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


def import_comfy(root: Path):  # noqa: ANN201
    from diffusers import UNet2DConditionModel  # noqa: F401 - loaded before the stand-ins exist

    missing = tuple(m for m in UNRELATED if importlib.util.find_spec(m) is None)
    if missing:
        print(f"(empty stand-ins for {', '.join(missing)})")
        sys.meta_path.insert(0, _EmptyFinder(missing))
    sys.path.insert(0, str(root))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd

    return comfy.sd


def inputs(model, seed: int = 0, latent: int = 16):  # noqa: ANN001, ANN201
    cfg = model.configs["unet"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg["in_channels"], latent, latent, generator=g)
    t = torch.tensor([999.0, 400.0])
    ctx = torch.randn(2, 77, cfg["cross_attention_dim"], generator=g)
    added = None
    if model.family.is_sdxl:
        added = {
            "text_embeds": torch.randn(2, 1280, generator=g),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2),
        }
    return x, t, ctx, added


def kept_linears(path: Path, model) -> list[str]:  # noqa: ANN001
    """Linear weights a scaled-fp8 file keeps at the source precision (diffusers names)."""
    from sdcompress.checkpoint.keymap import unet as unet_map
    from sdcompress.checkpoint.safetensors_io import SafetensorsFile

    f = SafetensorsFile(path)
    p = "model.diffusion_model."
    names = [k[len(p) :] for k, (dt, shape, *_) in f.entries.items()
             if k.startswith(p) and k.endswith(".weight") and len(shape) == 2 and dt in ("F16", "F32", "BF16")
             and k[: -len(".weight")] + ".scale_weight" not in f.entries]  # fmt: skip
    return list(unet_map.from_single_file_names(names, model.unet_layout).values())


def ours(path: Path, x, t, ctx, added, legacy: bool = False):  # noqa: ANN001, ANN201
    """Our dequantized U-Net; with `legacy`, kept Linears rounded to fp8 as ComfyUI <= 0.3.64 does."""
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.quantize.report import unet_module

    model = load_model(path)
    unet = unet_module(model)
    if legacy:
        params = dict(unet.named_parameters())
        for name in kept_linears(path, model):
            params[name].data = params[name].data.to(torch.float8_e4m3fn).float()
    with torch.no_grad():
        out = unet(x, t, ctx, added_cond_kwargs=added, return_dict=False)[0]
        y = None
        if added is not None:  # ComfyUI takes SDXL's added conditioning as one vector
            ids = unet.add_time_proj(added["time_ids"].flatten()).reshape(x.shape[0], -1)
            y = torch.cat([added["text_embeds"], ids], dim=-1)
    del unet
    return out, y


def comfy_out(sd_mod, path: Path, x, t, ctx, y):  # noqa: ANN001, ANN201
    patcher = sd_mod.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    base = patcher.model
    unet = base.diffusion_model
    w = next(p for n, p in unet.named_parameters() if n.endswith("attn1.to_q.weight"))
    with torch.no_grad():
        out = unet(x, timesteps=t, context=ctx, y=y)
    return type(base.model_config).__name__, str(w.dtype), out


def check(sd_mod, family: str, work: Path, formats: list[str]) -> None:
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.services.quantize import QuantizeRequest, quantize
    from sdcompress.testing import cached_random_model

    if family == "ssd-1b":  # the SSD-1B student cut from the random SDXL by `sdcompress prune` (streams)
        from sdcompress.services.prune import PruneRequest, prune

        src = work / "ssd-1b.safetensors"
        prune(
            PruneRequest(
                str(cached_random_model("sdxl")), str(src), preset="ssd-1b", select="uniform", overwrite=True
            )
        )
    else:
        src = cached_random_model(family)
    model = load_model(src)
    x, t, ctx, added = inputs(model)
    for fmt in formats:
        out = work / f"{family}-{fmt}.safetensors"
        quantize(QuantizeRequest(str(src), str(out), fmt, report=False, overwrite=True))
        mine, y = ours(out, x, t, ctx, added)
        detected, stored, theirs = comfy_out(sd_mod, out, x, t, ctx, y)
        rel = float((theirs.float() - mine).norm() / mine.norm())
        print(f"{family:6} {fmt:11} ComfyUI detected {detected:8} to_q stored {stored:20} "
              f"output vs ours: relative {rel:.2e}")  # fmt: skip
        if fmt == "fp8-scaled":
            legacy, _ = ours(out, x, t, ctx, added, legacy=True)
            rel = float((theirs.float() - legacy).norm() / legacy.norm())
            print(f"{'':17} vs ours with the kept Linears also rounded to fp8 (scale 1): relative {rel:.2e}")
        out.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    ap.add_argument("--family", action="append", choices=["sd1", "sdxl", "ssd-1b"])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--formats", default="fp8,fp8-scaled")
    args = ap.parse_args()
    sd_mod = import_comfy(args.comfyui)
    version = (args.comfyui / "comfyui_version.py").read_text().split('"')[1]
    print(f"ComfyUI {version} ({args.comfyui}), torch {torch.__version__}, CPU")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for family in args.family or ["sd1"]:
            check(sd_mod, family, Path(tmp), args.formats.split(","))


if __name__ == "__main__":
    main()
