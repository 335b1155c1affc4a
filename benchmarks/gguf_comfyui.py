"""Our GGUF U-Nets read by ComfyUI-GGUF's own loader and dequantizer, and reopened by the gguf package.

    python benchmarks/gguf_comfyui.py --comfyui PATH/ComfyUI --comfyui-gguf PATH/ComfyUI-GGUF \
        [--models sd1,sdxl,ssd-1b] [--formats gguf-q8_0,gguf-q4_0] [--work DIR] [--detect]

For each full-size random-weight U-Net (SD 1.5 from the reused cache in sdcompress/testing.py; SDXL
drawn tensor by tensor from its config; an SSD-1B student cut from that SDXL by the prune library)
and each format: write the GGUF with `write_gguf`, load it with ComfyUI-GGUF's `gguf_sd_loader`,
dequantize every tensor with its `dequantize_tensor` and compare with our `read_gguf`, reopen it with
`gguf.GGUFReader`. `--detect` also hands ComfyUI-GGUF's state dict to ComfyUI's
`load_diffusion_model_state_dict` with ComfyUI-GGUF's ops, as its UNet loader node does, and prints
the model type ComfyUI detects. One row per file; exit 1 when a tensor differs. Both repositories are
not on CI's machines: without them this prints why and exits 0. docs/gguf.md records a run.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from sdcompress.choices import QuantFormat
from sdcompress.quantize.gguf import read_gguf, write_gguf


def _import_comfyui(comfyui: Path, comfyui_gguf: Path) -> object:
    """ComfyUI's modules on CPU, then ComfyUI-GGUF imported as a package (its folder name has a dash)."""
    sys.path.insert(0, str(comfyui))
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or a CUDA build beside a CPU torch
        # comfy.model_base imports every model family; only the Cosmos video model needs torchvision, at
        # import time, and no SD path touches it. A CPU build matching this torch is not on PyPI.
        import types
        from importlib.machinery import ModuleSpec

        for name in ("torchvision", "torchvision.transforms"):
            stub = types.ModuleType(name)
            stub.__spec__ = ModuleSpec(name, None)
            sys.modules[name] = stub
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (reads --cpu)

    sys.argv = argv
    spec = importlib.util.spec_from_file_location(
        "comfyui_gguf", comfyui_gguf / "__init__.py", submodule_search_locations=[str(comfyui_gguf)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_gguf"] = package
    spec.loader.exec_module(package)
    import comfyui_gguf.dequant
    import comfyui_gguf.loader
    import comfyui_gguf.ops

    return comfyui_gguf


def _sources(names: list[str]) -> Iterator[tuple[str, str, dict]]:
    """(name, GGUF arch, lazy U-Net state dict in original names without the prefix)."""
    from sdcompress.checkpoint.keymap.unet import unet_to_single_file
    from sdcompress.checkpoint.resolve import load_model
    from sdcompress.testing import cached_random_model, random_full_model

    for name in names:
        if name == "sd1":
            model = load_model(cached_random_model("sd1"))
            yield (
                "SD 1.5 (random, cached file)",
                "sd1",
                unet_to_single_file(model.components["unet"], model.unet_layout),
            )
        elif name == "sdxl":
            model = random_full_model("sdxl")
            yield (
                "SDXL (random, drawn)",
                "sdxl",
                unet_to_single_file(model.components["unet"], model.unet_layout),
            )
        elif name == "ssd-1b":
            from sdcompress.arch.layout import layout_from_config
            from sdcompress.prune.mapping import key_map, prefix_table, student_shapes, student_state_dict
            from sdcompress.prune.plan import choose_blocks, plan_structure, student_config

            teacher = random_full_model("sdxl")
            plan = plan_structure(
                teacher,
                preset="ssd-1b",
                drop_transformer_blocks=None,
                layers_per_block=None,
                mid_block=None,
                depths=None,
            )
            depths, kept = choose_blocks(teacher.configs["unet"], plan, "uniform", {})
            config = student_config(teacher.configs["unet"], plan, depths)
            shapes = student_shapes(config)
            student = student_state_dict(
                teacher.components["unet"], shapes, key_map(shapes, prefix_table(plan.skeleton, kept))
            )
            yield (
                "SSD-1B student of that SDXL (prune library)",
                "sdxl",
                unet_to_single_file(student, layout_from_config(config)),
            )
        else:
            raise SystemExit(f"unknown model {name!r}; choose from sd1, sdxl, ssd-1b")


def _detect(cg: object, state_dict: dict) -> str:
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(
        state_dict, model_options={"custom_operations": cg.ops.GGMLOps}
    )
    return type(model.model.model_config).__name__ if model is not None else "not detected"


def check(cg: object, path: Path, detect: bool) -> dict:
    import gguf

    theirs, arch = cg.loader.gguf_sd_loader(str(path), return_arch=True)
    worst, rel16, count, quantized = 0.0, 0.0, 0, 0
    for name, ours in read_gguf(path):
        t = theirs[name]
        quantized += cg.dequant.is_quantized(t)
        # dequant_dtype float32 is ComfyUI-GGUF's full-precision path (a loader option): it must equal ours.
        exact = cg.dequant.dequantize_tensor(t, dtype=torch.float32, dequant_dtype=torch.float32)
        exact = exact.as_subclass(torch.Tensor)
        if exact.shape != ours.shape:
            raise SystemExit(
                f"{path.name}: {name} is {tuple(exact.shape)} in ComfyUI-GGUF, {tuple(ours.shape)} here"
            )
        worst = max(worst, (exact - ours).abs().max().item())
        # its default dequantizes in the scale's fp16, so it differs from ours by fp16 rounding
        default = cg.dequant.dequantize_tensor(t, dtype=torch.float32).as_subclass(torch.Tensor)
        rel16 = max(rel16, ((default - ours).norm() / ours.norm().clamp_min(1e-30)).item())
        count += 1
    if count != len(theirs):
        raise SystemExit(f"{path.name}: ComfyUI-GGUF read {len(theirs)} tensors, read_gguf {count}")
    reader = gguf.GGUFReader(path)
    row = {
        "tensors": count,
        "quantized": quantized,
        "arch": arch,
        "max_abs_diff": worst,
        "default_rel": rel16,
    }
    row["reader_tensors"] = len(reader.tensors)
    if detect:
        row["detected"] = _detect(cg, theirs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", type=Path, required=True)
    ap.add_argument("--comfyui-gguf", type=Path, required=True)
    ap.add_argument("--models", default="sd1,sdxl,ssd-1b")
    ap.add_argument("--formats", default="gguf-q8_0,gguf-q4_0")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdcompress-gguf-check"))
    ap.add_argument("--detect", action="store_true")
    args = ap.parse_args()
    missing = [p for p in (args.comfyui / "comfy", args.comfyui_gguf / "loader.py") if not p.exists()]
    if missing:
        print(
            f"skipped: {', '.join(map(str, missing))} not found (fetch Comfy-Org/ComfyUI and city96/ComfyUI-GGUF)"
        )
        return
    # built before ComfyUI is imported: its torchvision stand-in (see _import_comfyui) would mislead
    # diffusers' own imports, which building the models' shapes needs
    sources = list(_sources(args.models.split(",")))
    cg = _import_comfyui(args.comfyui, args.comfyui_gguf)
    args.work.mkdir(parents=True, exist_ok=True)
    formats = [QuantFormat.parse(f, "--formats") for f in args.formats.split(",")]
    failed = False
    print(
        "| model | format | arch | size MB | tensors (quantized) | write s | check s "
        "| max abs diff (fp32 dequant) | rel. diff (default fp16 dequant) | GGUFReader | ComfyUI detects |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, arch, unet in sources:
        for fmt in formats:
            path = args.work / f"{arch}-{len(unet)}-{fmt}.gguf"
            t0 = time.perf_counter()
            write_gguf(
                path, ((k, v.load()) for k, v in unet.items()), arch=arch, fmt=fmt, keep=lambda n, t: False
            )
            t1 = time.perf_counter()
            row = check(cg, path, args.detect)
            t2 = time.perf_counter()
            failed |= row["max_abs_diff"] != 0.0 or row["reader_tensors"] != row["tensors"]
            print(
                f"| {label} | {fmt} | {row['arch']} | {path.stat().st_size / 2**20:.0f} "
                f"| {row['tensors']} ({row['quantized']}) | {t1 - t0:.0f} | {t2 - t1:.0f} | {row['max_abs_diff']:.3g} "
                f"| {row['default_rel']:.2g} | {row['reader_tensors']} tensors "
                f"| {row.get('detected', '-')} |",
                flush=True,
            )
            path.unlink()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
