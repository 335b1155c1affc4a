"""The model families sdcompress knows, as data.

A family is the set of configs that make a whole pipeline: U-Net, VAE, text
encoders, scheduler, plus the few facts a single file cannot tell by its
shapes (VAE scaling factor, default resolution, prediction type, pipeline
class) and what the world calls it: the names users type, its Hub
repository, the license of its weights and its Hub tag. Everything else is
inferred from weights (`arch.infer`) or derived from these tables
(`arch.presets`), so a new family is one new entry here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from sdcompress.errors import SdcError

Config = dict[str, Any]

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_XL_DOWN = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
_XL_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]

_UNET_COMMON: Config = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "upcast_attention": False,
}


def _unet(**changes: Any) -> Config:
    cfg = copy.deepcopy(_UNET_COMMON)
    cfg.update(changes)
    return cfg


def _vae(block_out: list[int], *, layers: int = 2, sample_size: int, scaling: float, upcast: bool) -> Config:
    n = len(block_out)
    return {
        "act_fn": "silu",
        "block_out_channels": block_out,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": scaling,
        "force_upcast": upcast,
    }


def _clip(
    hidden: int,
    layers: int,
    *,
    inter: int,
    act: str,
    projection: int | None = None,
    with_projection: bool = False,
) -> Config:
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": projection or hidden,
        "layer_norm_eps": 1e-05,
        # the published SD / SDXL text-encoder configs carry these ids (pooling uses them as diffusers does)
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


_SCALED_LINEAR = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def _scheduler(name: str, prediction_type: str = "epsilon") -> Config:
    cfg: Config = {"_class_name": name, **_SCALED_LINEAR, "prediction_type": prediction_type}
    if name == "PNDMScheduler":
        cfg.update(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    elif name == "DDIMScheduler":
        cfg.update(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif name == "EulerDiscreteScheduler":
        cfg.update(steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
    return cfg


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder slot of a pipeline and how the single file stores it."""

    component: str  # "text_encoder" or "text_encoder_2"
    single_file_prefix: str  # e.g. "cond_stage_model.transformer." or "conditioner.embedders.1.model."
    openclip: bool  # OpenCLIP layout (fused in_proj, resblocks) in the single file
    config: Config
    pad_token: str  # "<|endoftext|>" (OpenAI CLIP) or "!" (OpenCLIP)
    num_layers_in_file: int | None = None  # SD 2 stores 24 layers and diffusers uses 23


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    unet: Config
    vae: Config
    text_encoders: tuple[TextEncoderSpec, ...]
    scheduler: Config
    pipeline_class: str
    resolution: int
    base_model_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str
    tiny: bool = False
    hub_id: str | None = None  # the published weights; `name` and `aliases` resolve to it
    pipeline_extra: Config = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # other names users type for the family (SD15, sd2.1...)
    hub_aliases: dict[str, str] = field(default_factory=dict)  # more short names -> Hub repositories
    stands_in_for: str | None = None  # the family whose layout this one shares (tiny models, SD 2 at 768)
    license: str = "other"  # of the published weights; a derivative inherits it
    hub_tag: str | None = None  # the Hub's tag for pipelines of this family

    @property
    def topology(self) -> str:
        """The family whose layout this one has (tiny-sd -> sd1, sd2-v -> sd2): presets, LoRAs and merges
        treat families of one topology alike."""
        return self.stands_in_for or self.name

    @property
    def is_sdxl(self) -> bool:
        return self.topology in ("sdxl", "sdxl-refiner")

    @property
    def prediction_type(self) -> str:
        return self.scheduler.get("prediction_type", "epsilon")


_CLIP_L = _clip(768, 12, inter=3072, act="quick_gelu")
_VIT_H = _clip(1024, 23, inter=4096, act="gelu", projection=512)
_BIGG = _clip(1280, 32, inter=5120, act="gelu", projection=1280, with_projection=True)

_SD_VAE_512 = _vae([128, 256, 512, 512], sample_size=512, scaling=0.18215, upcast=False)
_SDXL_VAE = _vae([128, 256, 512, 512], sample_size=1024, scaling=0.13025, upcast=True)


def _sd1_text(cfg: Config) -> tuple[TextEncoderSpec, ...]:
    return (TextEncoderSpec("text_encoder", "cond_stage_model.transformer.", False, cfg, "<|endoftext|>"),)


def _sdxl_text(clip_l: Config, big_g: Config) -> tuple[TextEncoderSpec, ...]:
    return (
        TextEncoderSpec(
            "text_encoder", "conditioner.embedders.0.transformer.", False, clip_l, "<|endoftext|>"
        ),
        TextEncoderSpec("text_encoder_2", "conditioner.embedders.1.model.", True, big_g, "!"),
    )


_SD2_UNET = dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)

FAMILIES: dict[str, Family] = {}


def _register(f: Family) -> None:
    FAMILIES[f.name] = f


_register(
    Family(
        name="sd1",
        title="Stable Diffusion 1.x",
        unet=_unet(
            block_out_channels=[320, 640, 1280, 1280],
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
            attention_head_dim=8,
            cross_attention_dim=768,
            sample_size=64,
        ),
        vae=_SD_VAE_512,
        text_encoders=_sd1_text(_CLIP_L),
        scheduler=_scheduler("PNDMScheduler"),
        pipeline_class="StableDiffusionPipeline",
        resolution=512,
        base_model_version="sd_v1",
        modelspec_architecture="stable-diffusion-v1",
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        pipeline_extra={"requires_safety_checker": False},
        aliases=("sd15", "sd1.5"),
        license="creativeml-openrail-m",
        hub_tag="stable-diffusion",
    )
)
_SD2_TEXT = (
    TextEncoderSpec("text_encoder", "cond_stage_model.model.", True, _VIT_H, "!", num_layers_in_file=24),
)
_register(
    Family(
        name="sd2",
        title="Stable Diffusion 2.x (512, epsilon)",
        unet=_unet(
            block_out_channels=[320, 640, 1280, 1280],
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
            sample_size=64,
            **_SD2_UNET,
        ),
        vae=_SD_VAE_512,
        text_encoders=_SD2_TEXT,
        scheduler=_scheduler("DDIMScheduler"),
        pipeline_class="StableDiffusionPipeline",
        resolution=512,
        base_model_version="sd_v2",
        modelspec_architecture="stable-diffusion-v2-512",
        hub_id="stabilityai/stable-diffusion-2-base",
        pipeline_extra={"requires_safety_checker": False},
        aliases=("sd2-base",),
        hub_aliases={"sd21-base": "stabilityai/stable-diffusion-2-1-base"},
        license="openrail++",
        hub_tag="stable-diffusion",
    )
)
_register(
    Family(
        name="sd2-v",
        title="Stable Diffusion 2.x (768, v-prediction)",
        unet=_unet(
            block_out_channels=[320, 640, 1280, 1280],
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
            sample_size=96,
            **{**_SD2_UNET, "upcast_attention": True},
        ),
        vae={**_SD_VAE_512, "sample_size": 768},
        text_encoders=_SD2_TEXT,
        scheduler=_scheduler("DDIMScheduler", "v_prediction"),
        pipeline_class="StableDiffusionPipeline",
        resolution=768,
        base_model_version="sd_v2_v",
        modelspec_architecture="stable-diffusion-v2-768-v",
        hub_id="stabilityai/stable-diffusion-2-1",
        pipeline_extra={"requires_safety_checker": False},
        aliases=("sd21", "sd2.1"),
        stands_in_for="sd2",
        license="openrail++",
        hub_tag="stable-diffusion",
    )
)
_register(
    Family(
        name="sdxl",
        title="Stable Diffusion XL base",
        unet=_unet(
            block_out_channels=[320, 640, 1280],
            down_block_types=_XL_DOWN,
            up_block_types=_XL_UP,
            transformer_layers_per_block=[1, 2, 10],
            attention_head_dim=[5, 10, 20],
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            sample_size=128,
        ),
        vae=_SDXL_VAE,
        text_encoders=_sdxl_text(_CLIP_L, _BIGG),
        scheduler=_scheduler("EulerDiscreteScheduler"),
        pipeline_class="StableDiffusionXLPipeline",
        resolution=1024,
        base_model_version="sdxl_base_v1-0",
        modelspec_architecture="stable-diffusion-xl-v1-base",
        hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        license="openrail++",
        hub_tag="stable-diffusion-xl",
    )
)
_register(
    Family(
        name="sdxl-refiner",
        title="Stable Diffusion XL refiner",
        unet=_unet(
            block_out_channels=[384, 768, 1536, 1536],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=4,
            attention_head_dim=[6, 12, 24, 24],
            cross_attention_dim=1280,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2560,
            sample_size=128,
        ),
        vae=_SDXL_VAE,
        text_encoders=(
            TextEncoderSpec("text_encoder_2", "conditioner.embedders.0.model.", True, _BIGG, "!"),
        ),
        scheduler=_scheduler("EulerDiscreteScheduler"),
        pipeline_class="StableDiffusionXLImg2ImgPipeline",
        resolution=1024,
        base_model_version="sdxl_refiner_v1-0",
        modelspec_architecture="stable-diffusion-xl-v1-refiner",
        hub_id="stabilityai/stable-diffusion-xl-refiner-1.0",
        pipeline_extra={"requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False},
        license="openrail++",
        hub_tag="stable-diffusion-xl",
    )
)

# Tiny stand-ins: the same topology as SD 1.x and SDXL (levels, block kinds,
# transformer depths), tiny widths. They exist so that every command, test and
# the demo run offline in seconds, and so that every preset applies to them.
_TINY_CLIP = {**_clip(32, 2, inter=64, act="quick_gelu")}
# A different width from the first encoder, as in SDXL (diffusers tells the two apart by width).
_TINY_CLIP_G = {**_clip(64, 2, inter=128, act="gelu", projection=64, with_projection=True)}
_TINY_VAE_SD = _vae([32, 64], layers=1, sample_size=64, scaling=0.18215, upcast=False)
_TINY_VAE_XL = _vae([32, 64], layers=1, sample_size=64, scaling=0.13025, upcast=True)

_register(
    Family(
        name="tiny-sd",
        title="tiny SD 1.x-shaped test model",
        unet=_unet(
            block_out_channels=[32, 64, 128, 128],
            down_block_types=_SD_DOWN,
            up_block_types=_SD_UP,
            attention_head_dim=8,
            cross_attention_dim=32,
            sample_size=32,
        ),
        vae=_TINY_VAE_SD,
        text_encoders=_sd1_text(_TINY_CLIP),
        scheduler=_scheduler("PNDMScheduler"),
        pipeline_class="StableDiffusionPipeline",
        resolution=64,
        base_model_version="sd_v1",
        modelspec_architecture="stable-diffusion-v1",
        tiny=True,
        pipeline_extra={"requires_safety_checker": False},
        stands_in_for="sd1",
        license="apache-2.0",  # random weights made by sdcompress itself
    )
)
_register(
    Family(
        name="tiny-sdxl",
        title="tiny SDXL-shaped test model",
        unet=_unet(
            block_out_channels=[32, 64, 128],
            down_block_types=_XL_DOWN,
            up_block_types=_XL_UP,
            transformer_layers_per_block=[1, 2, 10],
            attention_head_dim=[1, 1, 2],
            cross_attention_dim=32 + 64,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=64 + 6 * 256,
            sample_size=32,
        ),
        vae=_TINY_VAE_XL,
        text_encoders=_sdxl_text(_TINY_CLIP, _TINY_CLIP_G),
        scheduler=_scheduler("EulerDiscreteScheduler"),
        pipeline_class="StableDiffusionXLPipeline",
        resolution=64,
        base_model_version="sdxl_base_v1-0",
        modelspec_architecture="stable-diffusion-xl-v1-base",
        tiny=True,
        stands_in_for="sdxl",
        license="apache-2.0",
    )
)

ALIASES: dict[str, str] = {alias: f.name for f in FAMILIES.values() for alias in f.aliases}
TINY_MODELS = tuple(f.name for f in FAMILIES.values() if f.tiny)


def find_family(name: str) -> Family | None:
    """The family called `name` (or one of its aliases), case-insensitively; None if there is none."""
    key = name.lower()
    return FAMILIES.get(ALIASES.get(key, key))


def get_family(name: str) -> Family:
    family = find_family(name)
    if family is None:
        raise SdcError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}.")
    return family


def family_hub_repo(name: str) -> str | None:
    """The Hub repository a family name, alias or family hub alias stands for (None: not one)."""
    key = name.lower()
    family = find_family(key)
    if family is not None and not family.tiny:
        return family.hub_id
    return next((f.hub_aliases[key] for f in FAMILIES.values() if key in f.hub_aliases), None)


def unet_config(family: str) -> Config:
    return copy.deepcopy(get_family(family).unet)
