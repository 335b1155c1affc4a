"""Turning what the user typed into a `Model`.

One resolver for every command: a diffusers folder (pipeline or a lone
U-Net), a single `.safetensors` file (full pipeline or U-Net only, in
original or diffusers names), a pickled `.ckpt`/`.bin` only with
`--allow-pickle` (and then `weights_only=True`), a hub id or alias (downloaded
with huggingface_hub when online), or a built-in tiny model. Reading is lazy:
only headers are parsed here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from sdcompress.arch.families import TINY_MODELS, Config
from sdcompress.arch.infer import infer_unet_config
from sdcompress.arch.layout import layout_from_config
from sdcompress.arch.presets import hub_repo
from sdcompress.checkpoint.conventions import EXTRAS_FILE, MARKERS, PICKLE_SUFFIXES
from sdcompress.checkpoint.keymap import text as text_map
from sdcompress.checkpoint.keymap import unet as unet_map
from sdcompress.checkpoint.keymap import vae as vae_map
from sdcompress.checkpoint.model import Model
from sdcompress.checkpoint.safetensors_io import SafetensorsFile
from sdcompress.checkpoint.tensors import LazyTensor, StateDict
from sdcompress.choices import PredictionType
from sdcompress.errors import SdcError

_SCHEDULE_BUFFERS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
}
_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def load_model(
    ref: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    ema: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
    prediction_type: str | None = None,
) -> Model:
    """Resolve `ref` and read its headers into a lazy `Model`."""
    text = str(ref)
    prediction_type = PredictionType.parse_optional(prediction_type, "--prediction-type")
    if text.lower() in TINY_MODELS:
        from sdcompress.checkpoint.tiny import tiny_model_path

        model = load_model(
            tiny_model_path(text.lower()), ema=ema, tokenizer=tokenizer, prediction_type=prediction_type
        )
        model.ref = text.lower()
        return model
    path = Path(text).expanduser()
    if path.exists():
        model = _load_path(path, allow_pickle=allow_pickle, ema=ema, prediction_type=prediction_type)
    elif (repo := hub_repo(text)) or re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):
        model = _load_path(
            _download(repo or text), allow_pickle=allow_pickle, ema=ema, prediction_type=prediction_type
        )
    else:
        raise SdcError(
            f"{text} does not exist; give a diffusers folder, a .safetensors file, a hub id or tiny-sd."
        )
    model.ref = text
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not tok.is_dir():
            raise SdcError(
                f"--tokenizer {tok} is not a folder; give a diffusers pipeline or tokenizer folder."
            )
        for name in ("tokenizer", "tokenizer_2"):
            sub = tok / name
            if sub.is_dir():
                model.tokenizer_dirs[name] = sub
        if not model.tokenizer_dirs and (tok / "vocab.json").is_file():
            model.tokenizer_dirs["tokenizer"] = tok
    return model


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(
            snapshot_download(
                repo,
                allow_patterns=["*.json", "*.txt", "*.safetensors", "*/*.json", "*/*.txt", "*/*.safetensors"],
                ignore_patterns=["*.fp16.safetensors", "*/*.fp16.safetensors"],
            )
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        raise SdcError(
            f"could not download {repo} from the Hugging Face Hub ({type(e).__name__}); "
            "check the id and your network, or give a local path."
        ) from None


def _load_path(path: Path, *, allow_pickle: bool, ema: bool, prediction_type: str | None) -> Model:
    if path.is_dir():
        if ema:
            raise SdcError(f"{path} is a diffusers folder, which keeps no EMA copy to take; drop --ema.")
        return _load_folder(path, allow_pickle=allow_pickle, prediction_type=prediction_type)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        sd, metadata = _load_pickle(path, allow_pickle), {}
    elif path.suffix.lower() == ".gguf":
        sd, metadata = _load_gguf(path)
    else:
        from sdcompress.quantize.fp8 import quantized_view

        f = SafetensorsFile(path)
        sd, metadata = quantized_view(f.state_dict(), f.metadata)  # scaled fp8: scales multiplied out
    return split_single_file(sd, path=path, metadata=metadata, ema=ema, prediction_type=prediction_type)


def _load_gguf(path: Path) -> tuple[StateDict, dict[str, str]]:
    """A GGUF U-Net, dequantized into memory at fp16 (GGUF codes have no lazy float view), and
    what it holds (format, bits, share quantized) as the header entry `info` and the checks for
    quantized inputs read."""
    from sdcompress.quantize.gguf import gguf_metadata, read_gguf

    return {k: LazyTensor.of(t.to(torch.float16)) for k, t in read_gguf(path)}, gguf_metadata(path)


def _load_pickle(path: Path, allow_pickle: bool) -> StateDict:
    if not allow_pickle:
        raise SdcError(
            f"{path} is a pickled checkpoint, which can run code when loaded; "
            "pass --allow-pickle if you trust it, or use a .safetensors file."
        )
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's problem
        raise SdcError(
            f"{path} could not be read as a weights-only torch checkpoint ({type(e).__name__})."
        ) from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SdcError(f"{path} does not hold a state dict of tensors.")
    return {k: LazyTensor.of(v) for k, v in obj.items()}


# ----- single files ---------------------------------------------------------------------------


def _strip(sd: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _ema_key(unet_key: str) -> str:
    return "model_ema." + ("diffusion_model." + unet_key).replace(".", "")


def split_single_file(
    sd: StateDict,
    *,
    path: Path | None = None,
    metadata: dict[str, str] | None = None,
    ema: bool = False,
    prediction_type: str | None = None,
) -> Model:
    """Cut a single-file state dict into diffusers-named components and infer their configs."""
    where = str(path) if path else "the checkpoint"
    notes: list[str] = []
    prefix = next((p for p in _UNET_PREFIXES if any(k.startswith(p) for k in sd)), None)
    if prefix is not None:
        unet_sf = _strip(sd, prefix)
        fmt = "single-file"
    elif any(k.startswith(("input_blocks.", "time_embed.")) for k in sd):
        unet_sf, fmt = {k: v for k, v in sd.items() if k not in MARKERS}, "unet-only"
    elif any(k.startswith(("down_blocks.", "conv_in.")) for k in sd):
        unet_sf, fmt = None, "unet-only"
    else:
        raise SdcError(f"{where} holds no Stable Diffusion U-Net weights (no known key layout).")

    if ema:
        if unet_sf is None or not any(k.startswith("model_ema.") for k in sd):
            raise SdcError(f"{where} holds no EMA weights; drop --ema.")
        taken = 0
        for k in list(unet_sf):
            if _ema_key(k) in sd:
                unet_sf[k] = sd[_ema_key(k)]
                taken += 1
        notes.append(f"took {taken} EMA tensors")

    if unet_sf is not None:
        try:
            layout = unet_map.layout_from_single_file_keys(unet_sf)
            unet = unet_map.unet_from_single_file(unet_sf, layout)
        except KeyError as e:
            raise SdcError(f"{where} has a U-Net key sdcompress does not know: {e.args[0]}.") from None
    else:
        unet = {k: v for k, v in sd.items() if k not in MARKERS}
        layout = unet_map.layout_from_diffusers_keys(unet)

    meta = metadata or {}
    v_pred = _is_v_prediction(sd, meta, prediction_type)
    unet_config, family = infer_unet_config(unet, layout, v_prediction=v_pred)
    configs: dict[str, Config] = {"unet": unet_config, "scheduler": dict(family.scheduler)}
    if v_pred is not None:
        configs["scheduler"]["prediction_type"] = "v_prediction" if v_pred else "epsilon"
    components: dict[str, StateDict] = {"unet": unet}
    extras: StateDict = {k: v for k, v in sd.items() if k in MARKERS}
    used = set(extras)

    if fmt == "single-file":
        used |= {k for k in sd if k.startswith(prefix)}  # type: ignore[arg-type]
        vae_sf = _strip(sd, "first_stage_model.")
        if vae_sf:
            used |= {"first_stage_model." + k for k in vae_sf}
            try:
                components["vae"] = vae_map.vae_to_diffusers(vae_sf)
            except (KeyError, ValueError) as e:
                raise SdcError(f"{where} has a VAE key sdcompress does not know: {e}.") from None
            configs["vae"] = {**family.vae, **vae_map.infer_vae_config(components["vae"])}
        for spec in family.text_encoders:
            te_sf = _strip(sd, spec.single_file_prefix)
            if not te_sf:
                continue
            used |= {spec.single_file_prefix + k for k in te_sf}
            te, leftovers = _text_to_diffusers(te_sf, spec, where)
            extras.update({spec.single_file_prefix + k: v for k, v in leftovers.items()})
            components[spec.component] = te
            configs[spec.component] = {
                **spec.config,
                **text_map.infer_text_encoder_config(te, openclip=spec.openclip),
            }
        if "vae" not in components or len(components) < 2:
            notes.append("the file holds no complete pipeline; only the parts present were read")
        dropped = 0
        for k, v in sd.items():
            if k in used:
                continue
            base = k.rsplit(".", 1)[-1]
            if k in _SCHEDULE_BUFFERS or k.startswith("model_ema.") or base == "position_ids":
                dropped += 1
            else:
                extras[k] = v
        if dropped:
            notes.append(f"dropped {dropped} schedule buffers, EMA copies and position ids")
        if fmt == "single-file" and set(components) == {"unet"}:
            fmt = "unet-only"
    return Model(
        ref=str(path) if path else "<state dict>",
        path=path,
        format=fmt,
        family=family,
        components=components,
        configs=configs,
        extras=extras,
        metadata=dict(meta),
        notes=notes,
    )


def _text_to_diffusers(te_sf: StateDict, spec: Any, where: str) -> tuple[StateDict, StateDict]:
    try:
        if spec.openclip:
            with_projection = "CLIPTextModelWithProjection" in spec.config["architectures"]
            layers = spec.config["num_hidden_layers"] if spec.num_layers_in_file else None
            return text_map.openclip_to_diffusers(te_sf, num_layers=layers, with_projection=with_projection)
        return text_map.clip_to_diffusers(te_sf), {}
    except (KeyError, ValueError) as e:
        raise SdcError(f"{where} has a text-encoder key sdcompress does not know: {e}.") from None


def _is_v_prediction(sd: StateDict, meta: dict[str, str], override: str | None) -> bool | None:
    if override is not None:
        return PredictionType.parse(override, "--prediction-type") == PredictionType.V_PREDICTION
    if "v_pred" in sd or meta.get("modelspec.prediction_type") == "v":
        return True
    if meta.get("modelspec.prediction_type") == "epsilon":
        return False
    return None


# ----- diffusers folders -----------------------------------------------------------------------


def _read_json(path: Path) -> Config:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SdcError(f"{path} is not a readable JSON file ({type(e).__name__}).") from None


def _weights(folder: Path, stem: str, *, allow_pickle: bool = False) -> StateDict:
    """A component's weights: a safetensors file, a sharded one, or an fp16 variant."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return SafetensorsFile(folder / name).state_dict()
    for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors.index.fp16.json"):
        index = folder / name
        if index.is_file():
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            sd: StateDict = {}
            for shard in shards:
                sd.update(SafetensorsFile(folder / shard).state_dict())
            return sd
    if (folder / f"{stem}.bin").is_file():
        return _load_pickle(folder / f"{stem}.bin", allow_pickle)
    raise SdcError(f"{folder} has no {stem}.safetensors; the diffusers folder is incomplete.")


_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def _load_folder(path: Path, *, allow_pickle: bool, prediction_type: str | None) -> Model:
    index = path / "model_index.json"
    if not index.is_file():
        if (path / "config.json").is_file() and _read_json(path / "config.json").get("_class_name") == (
            "UNet2DConditionModel"
        ):
            return _finish_folder(path, {"unet": path}, None, prediction_type, allow_pickle, fmt="unet-only")
        raise SdcError(
            f"{path} is not a diffusers folder (no model_index.json); give a pipeline folder or a file."
        )
    listed = _read_json(index)
    parts = {
        c: path / c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if listed.get(c, [None])[0]
    }
    if "unet" not in parts:
        raise SdcError(f"{path} has no U-Net; sdcompress works on Stable Diffusion pipelines.")
    return _finish_folder(path, parts, listed, prediction_type, allow_pickle, fmt="diffusers")


def _finish_folder(
    path: Path,
    parts: dict[str, Path],
    listed: Config | None,
    prediction_type: str | None,
    allow_pickle: bool,
    *,
    fmt: str,
) -> Model:
    components: dict[str, StateDict] = {}
    configs: dict[str, Config] = {}
    for name, folder in parts.items():
        if not (folder / "config.json").is_file():
            raise SdcError(f"{folder} has no config.json; the diffusers folder is incomplete.")
        config = _read_json(folder / "config.json")
        configs[name] = {k: v for k, v in config.items() if not k.startswith("_")}
        sd = _weights(folder, _WEIGHT_STEMS.get(name, "model"), allow_pickle=allow_pickle)
        # transformers 5 saves CLIPTextModel without `text_model.`; the canonical form has it.
        if name.startswith("text_encoder"):
            sd = text_map.clip_to_diffusers(sd)
        elif name == "vae":
            sd = vae_map.normalize_vae_keys(sd)  # older folders use query/key/value/proj_attn
        components[name] = sd
    sched_file = path / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(sched_file) if sched_file.is_file() else None
    v_pred = None
    if prediction_type is not None:
        v_pred = prediction_type == "v_prediction"
    elif scheduler is not None:
        v_pred = scheduler.get("prediction_type") == "v_prediction"
    layout = layout_from_config(configs["unet"])
    _, family = infer_unet_config(components["unet"], layout, v_prediction=v_pred)
    configs["scheduler"] = scheduler or dict(family.scheduler)
    if prediction_type is not None:
        configs["scheduler"]["prediction_type"] = str(prediction_type)
    extras = SafetensorsFile(path / EXTRAS_FILE).state_dict() if (path / EXTRAS_FILE).is_file() else {}
    tokenizer_dirs = {
        t: path / t for t in ("tokenizer", "tokenizer_2") if (path / t / "vocab.json").is_file()
    }
    return Model(
        ref=str(path),
        path=path,
        format=fmt,
        family=family,
        components=components,
        configs=configs,
        extras=extras,
        tokenizer_dirs=tokenizer_dirs,
    )


__all__ = ["load_model", "split_single_file"]
