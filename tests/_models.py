"""Models for tests: full-size configs on the meta device, and tiny students with random weights."""

from __future__ import annotations

import torch

from sdcompress.arch.families import Config, get_family
from sdcompress.arch.presets import preset_config
from sdcompress.checkpoint.instantiate import module_from_config
from sdcompress.checkpoint.keymap import text as text_map
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.tensors import LazyTensor, StateDict


def _meta_sd(component: str, config: Config) -> StateDict:
    sd = {k: LazyTensor.of(v) for k, v in module_from_config(component, config).state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    return text_map.clip_to_diffusers(sd) if component.startswith("text") else sd


def meta_model(family: str, preset: str | None = None, *, unet_only: bool = False) -> Model:
    """A full-size pipeline (or preset student) whose tensors live on the meta device."""
    fam = get_family(family)
    unet_cfg = preset_config(preset, family) if preset else dict(fam.unet)
    components = {"unet": _meta_sd("unet", unet_cfg)}
    configs: dict[str, Config] = {"unet": unet_cfg, "scheduler": dict(fam.scheduler)}
    if not unet_only:
        components["vae"] = _meta_sd("vae", fam.vae)
        configs["vae"] = dict(fam.vae)
        for spec in fam.text_encoders:
            components[spec.component] = _meta_sd(spec.component, spec.config)
            configs[spec.component] = dict(spec.config)
    return Model(
        ref=f"meta:{family}:{preset}",
        path=None,
        format="diffusers",
        family=fam,
        components=components,
        configs=configs,
    )


def random_student(teacher: Model, preset: str, seed: int = 0) -> Model:
    """The teacher's pipeline with a preset U-Net of random (distinct) weights."""
    cfg = preset_config(preset, teacher.family.name)
    module = module_from_config("unet", cfg).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    sd = {k: LazyTensor.of(torch.randn(v.shape, generator=gen)) for k, v in module.state_dict().items()}
    return teacher.with_unet(sd, cfg)


def mean_losses(task, data, seeds: int = 3) -> dict[str, float]:
    """Each loss term of a bound training task over a whole tiny dataset (32 px), averaged over seeds."""
    from sdcompress.training.data import DataConfig, build_dataset, collate

    dataset, _ = build_dataset(DataConfig(data_dir=data, resolution=32), seed=0)
    batch = collate([dataset[(i, 0)] for i in range(len(dataset))])
    totals: dict[str, float] = {}
    with torch.no_grad():
        for seed in range(seeds):
            for name, value in task.compute_loss(batch, torch.Generator().manual_seed(seed)).items():
                totals[name] = totals.get(name, 0.0) + float(value) / seeds
    task.close()
    return totals
