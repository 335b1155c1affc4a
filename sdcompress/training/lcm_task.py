"""Latent consistency distillation (LCM, LCM-LoRA) as a task on the shared loop.

One step of the recipe (Luo et al. 2023, as diffusers' consistency_distillation examples run it):

1. pick a point of a DDIM grid over the teacher's schedule, t_{n+k}, and the next one t_n = t_{n+k} - k;
   noise the latents to t_{n+k}; draw a guidance scale w from [w_min, w_max];
2. the student maps z_{t_{n+k}} to the trajectory's origin, f = c_skip z + c_out x0_hat (the boundary
   scalings make f(z, 0) = z);
3. the frozen teacher, with classifier-free guidance w (cond + w (cond - uncond), the LCM paper's form),
   takes one DDIM step from t_{n+k} to t_n;
4. a target network maps that point to the origin too (no gradient): an EMA copy of a full student, or
   the LoRA student itself; the loss is Huber (or L2) between the two.

Predictions are compared in x0 space whatever the teacher and student predict (`noise.convert_prediction`).
A full student learns w through diffusers' guidance-scale embedding (`time_cond_proj_dim`), so an
inference pipeline's `guidance_scale` (= 1 + w) steers it; a LoRA student has no such input and learns
one guided model. Every random draw comes from the engine's per-step generator, so resume is exact; the
target network is checkpointed with the rest (`checkpoint_state`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdcompress.training.conditioning import Conditioning, unet_added_conditions
from sdcompress.training.config import ConsistencyConfig, LossConfig
from sdcompress.training.few_step import FewStepStudent
from sdcompress.training.noise import convert_prediction, sample_noise
from sdcompress.training.task import DiffusionParts, DiffusionTask, TrainingSummary, place_teacher

Saver = Callable[["LcmTask", Path, TrainingSummary], None]


def guidance_embedding(w: torch.Tensor, width: int) -> torch.Tensor:
    """The guidance-scale embedding diffusers' pipelines feed a U-Net with `time_cond_proj_dim`.

    The pipelines' own function (it does not use `self`), so training and inference embed w identically.
    """
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w.float(), embedding_dim=width)


def boundary_scalings(timesteps: torch.Tensor, scaling: float, sigma_data: float = 0.5):
    """c_skip, c_out of the consistency parametrisation (LCMScheduler's discrete form)."""
    t = timesteps.float() * scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2).sqrt()
    return c_skip, c_out


class DdimSolver:
    """The DDIM grid the teacher's ODE is solved on: k = T // N apart, ending at T - 1."""

    def __init__(self, alphas_cumprod: torch.Tensor, total: int, steps: int) -> None:
        self.skip = total // steps
        self.timesteps = torch.arange(1, steps + 1, dtype=torch.long) * self.skip - 1
        alphas = alphas_cumprod.float()
        self.alpha_prev = torch.cat([alphas[:1], alphas[self.timesteps[:-1]]])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One DDIM step from grid point `index` to the previous one, given the x0 and noise estimates."""
        alpha = self.alpha_prev.to(x0.device)[index].reshape(-1, *(1,) * (x0.ndim - 1))
        return alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps


def _view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *(1,) * (like.ndim - 1))


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """Pseudo-Huber sqrt(d^2 + c^2) - c (robust to outliers, as in LCM-LoRA) or the plain MSE."""
    pred, target = pred.float(), target.float()
    if kind == "huber":
        return (((pred - target) ** 2 + huber_c**2).sqrt() - huber_c).mean()
    return torch.nn.functional.mse_loss(pred, target)


class LcmTask(FewStepStudent, DiffusionTask):
    """Train `parts.unet` (the whole student, or its LoRA adapters) to be a latent consistency model."""

    name = "lcm"

    def __init__(
        self,
        parts: DiffusionParts,
        teacher: torch.nn.Module,
        config: ConsistencyConfig,
        *,
        saver: Saver,
        loss: LossConfig = LossConfig(),
        teacher_prediction: str | None = None,
        lora_spec=None,
        seed: int = 0,
    ) -> None:
        super().__init__(parts, loss)
        self.config = config
        self.saver = saver
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_prediction = str(teacher_prediction or parts.noise_scheduler.config.prediction_type)
        self.teacher_dtype = torch.float32
        scheduler = parts.noise_scheduler
        self.solver = DdimSolver(
            scheduler.alphas_cumprod, scheduler.config.num_train_timesteps, config.ddim_timesteps
        )
        self.w_width = getattr(parts.unet.config, "time_cond_proj_dim", None) or 0
        self.lora_paths: list[str] = []
        self.lora_spec = lora_spec
        if lora_spec is not None:
            from sdcompress.lowrank.targets import UNET
            from sdcompress.training.lora_task import add_adapters

            self.w_width = 0  # LCM-LoRA: no guidance embedding, one guided model
            with torch.random.fork_rng(devices=[]):  # peft draws the initial adapters from the global RNG
                torch.manual_seed(seed)
                self.lora_paths = add_adapters(parts.unet, UNET, lora_spec)
            self.target: torch.nn.Module | None = None
        else:
            parts.unet.requires_grad_(True)
            self.target = copy.deepcopy(parts.unet).eval().requires_grad_(False)
        self.student: torch.nn.Module = parts.unet
        self._uncond: Conditioning | None = None

    # -- TrainTask ---------------------------------------------------------

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.parts.unet}

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        self.parts.unet.train()
        return [{"params": [p for p in self.parts.unet.parameters() if p.requires_grad], "lr": lr}]

    def checkpoint_state(self) -> list[Any]:
        """What the engine checkpoints besides the trained modules: the EMA target network."""
        return [] if self.target is None else [self.target]

    def bind(
        self, prepared: dict[str, torch.nn.Module], device: torch.device, weight_dtype: torch.dtype
    ) -> None:
        self.student = prepared["unet"]
        self.move_frozen(device, weight_dtype)
        self.teacher_dtype = place_teacher(self.teacher, device, weight_dtype)
        if self.target is not None:
            self.target.to(device)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Move the target network toward the student: target = d * target + (1 - d) * student."""
        if self.target is None:
            return
        decay = self.config.target_ema_decay
        for tgt, src in zip(self.target.parameters(), self.parts.unet.parameters(), strict=True):
            tgt.mul_(decay).add_(src.detach().to(tgt.dtype), alpha=1 - decay)

    # -- the loss ------------------------------------------------------------

    def _x0(self, output: torch.Tensor, kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return convert_prediction(output.float(), kind, "sample", x, t, self.parts.noise_scheduler)

    def _eps(self, output: torch.Tensor, kind: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return convert_prediction(output.float(), kind, "epsilon", x, t, self.parts.noise_scheduler)

    def _call(self, unet, x, t, cond: Conditioning, added, w_emb=None, dtype=None) -> torch.Tensor:
        hidden = cond.hidden_states
        if dtype is not None:
            x, hidden = x.to(dtype), hidden.to(dtype)
            added = None if added is None else {k: v.to(dtype) for k, v in added.items()}
            w_emb = None if w_emb is None else w_emb.to(dtype)
        else:
            x, hidden = x.float(), hidden.float()
        kwargs: dict[str, Any] = {"added_cond_kwargs": added} if added is not None else {}
        if w_emb is not None:
            kwargs["timestep_cond"] = w_emb
        return unet(x, t, encoder_hidden_states=hidden, return_dict=False, **kwargs)[0]

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        cfg, scheduler = self.config, self.parts.noise_scheduler
        latents = self.latents(batch)
        cond = self.encode(batch)
        added = unet_added_conditions(cond, batch, self.device, torch.float32)
        size, device = latents.shape[0], latents.device
        noise = sample_noise(latents, self.loss_config.noise.offset, generator)
        index = torch.randint(0, len(self.solver.timesteps), (size,), generator=generator, device=device)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand((size,), generator=generator, device=device)
        start = self.solver.timesteps.to(device)[index]
        end = (start - self.solver.skip).clamp_min(0)
        noisy = scheduler.add_noise(latents, noise, start)
        w_emb = guidance_embedding(w, self.w_width).to(device) if self.w_width else None

        skip_s, out_s = (_view(c, latents) for c in boundary_scalings(start, cfg.timestep_scaling))
        skip_e, out_e = (_view(c, latents) for c in boundary_scalings(end, cfg.timestep_scaling))
        student_out = self._call(self.student, noisy, start, cond, added, w_emb)
        prediction = skip_s * noisy + out_s * self._x0(student_out, self.prediction_type, noisy, start)

        with torch.no_grad():
            uncond = self.uncond(cond)
            uncond_added = unet_added_conditions(uncond, batch, self.device, torch.float32)
            kind, dtype = self.teacher_prediction, self.teacher_dtype
            t_cond = self._call(self.teacher, noisy, start, cond, added, dtype=dtype)
            t_uncond = self._call(self.teacher, noisy, start, uncond, uncond_added, dtype=dtype)
            gw = _view(w, latents)
            x0_c, x0_u = self._x0(t_cond, kind, noisy, start), self._x0(t_uncond, kind, noisy, start)
            eps_c, eps_u = self._eps(t_cond, kind, noisy, start), self._eps(t_uncond, kind, noisy, start)
            x_prev = self.solver.step(x0_c + gw * (x0_c - x0_u), eps_c + gw * (eps_c - eps_u), index)
            target_net = self.target if self.target is not None else self.student
            target_out = self._call(target_net, x_prev, end, cond, added, w_emb)
            target = skip_e * x_prev + out_e * self._x0(target_out, self.prediction_type, x_prev, end)
        loss = consistency_loss(prediction, target, cfg.consistency_loss, cfg.huber_c)
        return {"loss": loss, "consistency": loss.detach()}
