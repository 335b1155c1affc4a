"""Distribution matching distillation (DMD2) as a task on the shared loop.

The recipe (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"):

- the student (generator) turns noise into latents in a few steps; with several steps it is trained by
  backward simulation: its own outputs, re-noised, feed its later steps, as at inference;
- the frozen teacher is the real score (with classifier-free guidance); a fake score U-Net, initialised
  from the teacher, learns the student's distribution with the ordinary denoising loss on the student's
  samples, several updates per student update (the two time-scale rule; an `AuxiliaryModel` the loop
  trains on its own optimizer);
- for a student sample x, noised to a random t, both scores give x0 estimates; with p = x - x0_hat the
  student is moved along grad = (p_real - p_fake) / mean|p_real| through the surrogate
  0.5 * MSE(x, stopgrad(x - grad)), whose gradient in x is grad / x.numel();
- optionally a GAN head on the fake U-Net's bottleneck features tells real (data) latents from student
  samples (non-saturating loss), and block-feature distillation against the teacher regularises.

The fake score is a full copy of the teacher, or a LoRA on the teacher module itself: the adapters on
give the fake score, the adapters off the real one, and the big weights are held once. Every random
draw comes from the loop's per-step generators, so resume is exact.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdcompress.errors import SdcError
from sdcompress.training.conditioning import Conditioning, unet_added_conditions
from sdcompress.training.config import DmdConfig, LossConfig
from sdcompress.training.features import FeaturePair, FeatureTaps
from sdcompress.training.few_step import FewStepStudent
from sdcompress.training.lcm_task import boundary_scalings
from sdcompress.training.losses import feature_mse
from sdcompress.training.noise import convert_prediction, training_target
from sdcompress.training.task import (
    AuxiliaryModel,
    DiffusionParts,
    DiffusionTask,
    TrainingSummary,
    place_teacher,
)

Saver = Callable[["Dmd2Task", Path, TrainingSummary], None]
TIMESTEP_SCALING = 10.0  # LCMScheduler's boundary scaling, so training and its sampler agree exactly


# ---------------------------------------------------------------------------- the mathematics


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised score difference: (p_real - p_fake) / mean|p_real| per sample, p = x - x0_hat."""
    p_real, p_fake = x - x0_real, x - x0_fake
    dims = tuple(range(1, x.ndim))
    grad = (p_real - p_fake) / p_real.abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num(grad)


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * MSE(x, stopgrad(x - grad)): its gradient in x is grad / x.numel(), zero when grad is."""
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())


class GanHead(torch.nn.Module):
    """A few convolutions on the fake U-Net's bottleneck features, pooled to one real/fake logit per sample."""

    def __init__(self, channels: int, width: int = 256) -> None:
        super().__init__()
        width = min(width, channels)
        groups = 32 if width % 32 == 0 else 1
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1),
            torch.nn.GroupNorm(groups, width),
            torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.GroupNorm(groups, width),
            torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(width, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(-1)


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """The module without its peft adapters (the real score, when the fake score is a LoRA on it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *(1,) * (like.ndim - 1))


def _inner(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DDP's wrapped model


# ---------------------------------------------------------------------------- the task


class Dmd2Task(FewStepStudent, DiffusionTask):
    """Train `parts.unet` (the whole student or its LoRA) by distribution matching against `teacher`."""

    name = "dmd2"

    def __init__(
        self,
        parts: DiffusionParts,
        teacher: torch.nn.Module,
        config: DmdConfig,
        timesteps: list[int],
        guidance: float,
        *,
        saver: Saver,
        loss: LossConfig = LossConfig(),
        teacher_prediction: str | None = None,
        lora_spec=None,
        fake_spec=None,
        fake_lr: float = 1e-5,
        kd_pairs: list[FeaturePair] = (),
        seed: int = 0,
    ) -> None:
        super().__init__(parts, loss)
        from sdcompress.lowrank.targets import UNET
        from sdcompress.training.lora_task import add_adapters

        self.config = config
        self.timesteps = [int(t) for t in sorted(timesteps, reverse=True)]
        self.guidance = float(guidance)
        self.saver = saver
        self.teacher_prediction = str(teacher_prediction or parts.noise_scheduler.config.prediction_type)
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_dtype = torch.float32
        self.lora_spec, self.lora_paths = lora_spec, []
        with torch.random.fork_rng(devices=[]):  # peft draws initial adapters from the global RNG
            torch.manual_seed(seed)
            if lora_spec is not None:
                self.lora_paths = _with_flag(lambda: add_adapters(parts.unet, UNET, lora_spec), "--lora")
            else:
                parts.unet.requires_grad_(True)
            self.shared_base = fake_spec is not None
            if self.shared_base:  # the fake score: adapters on the teacher's own (frozen) weights
                _with_flag(lambda: add_adapters(self.teacher, UNET, fake_spec), "--fake-lora")
                self.fake: torch.nn.Module = self.teacher
            else:
                self.fake = copy.deepcopy(self.teacher).train().requires_grad_(True)
            self.gan = None
            if config.gan_weight > 0:
                self.gan = GanHead(self.teacher.config.block_out_channels[-1])
        self.fake_lr = fake_lr
        self.student: torch.nn.Module = parts.unet
        self._mid: list[torch.Tensor] = []
        self._tap_mid = False
        self._mid_hook = _inner(self.fake).mid_block.register_forward_hook(self._keep_mid)
        self.kd_pairs = list(kd_pairs)
        self._student_taps = FeatureTaps(parts.unet, [p.student for p in self.kd_pairs], detach=False)
        self._teacher_taps = FeatureTaps(self.teacher, [p.teacher for p in self.kd_pairs], detach=True)
        self._uncond: Conditioning | None = None
        self._encoded: dict[int, tuple[dict[str, Any], tuple]] = {}  # id(batch) -> (batch, _inputs)
        self.fake_loss_calls = 0

    def _keep_mid(self, module, inputs, output) -> None:
        if self._tap_mid:  # only the fake score's own calls (the real score may run the same module)
            self._mid.append(output[0] if isinstance(output, tuple) else output)

    @contextlib.contextmanager
    def _mid_features(self) -> Iterator[list[torch.Tensor]]:
        self._mid.clear()
        self._tap_mid = True
        try:
            yield self._mid
        finally:
            self._tap_mid = False

    # -- TrainTask ---------------------------------------------------------

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.parts.unet}

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        self.parts.unet.train()
        return [{"params": [p for p in self.parts.unet.parameters() if p.requires_grad], "lr": lr}]

    def auxiliary_models(self) -> list[AuxiliaryModel]:
        """The fake score (and the GAN head it carries): `fake_updates` updates per student update."""
        modules: dict[str, torch.nn.Module] = {"fake": self.fake}
        params = [p for p in self.fake.parameters() if p.requires_grad]
        if self.gan is not None:
            modules["gan"] = self.gan
            params += list(self.gan.parameters())
        groups = [{"params": params, "lr": self.fake_lr}]
        return [AuxiliaryModel("fake", modules, groups, self.config.fake_updates, self.fake_loss)]

    def enable_gradient_checkpointing(self) -> None:
        super().enable_gradient_checkpointing()
        self.fake.enable_gradient_checkpointing()

    def bind(
        self, prepared: dict[str, torch.nn.Module], device: torch.device, weight_dtype: torch.dtype
    ) -> None:
        self.student = prepared["unet"]
        self.fake_model = prepared["fake"]
        self.gan_model = prepared.get("gan")
        self.move_frozen(device, weight_dtype)
        self.teacher_dtype = place_teacher(self.teacher, device, weight_dtype)
        if self.shared_base:  # the trained adapters stay fp32 on a half-precision base
            for param in self.fake.parameters():
                if param.requires_grad:
                    param.data = param.data.float()

    # -- scores and samples ---------------------------------------------------

    def _x0(self, unet, x, t, cond: Conditioning, added, kind: str, dtype=None) -> torch.Tensor:
        """A U-Net's x0 estimate at (x, t), whatever it predicts."""
        hidden = cond.hidden_states
        inputs, hidden = (x.to(dtype), hidden.to(dtype)) if dtype is not None else (x.float(), hidden.float())
        if added is not None and dtype is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        out = unet(inputs, t, encoder_hidden_states=hidden, return_dict=False, **kwargs)[0]
        return convert_prediction(out.float(), kind, "sample", x.float(), t, self.parts.noise_scheduler)

    def _fake_dtype(self) -> torch.dtype | None:
        return self.teacher_dtype if self.shared_base else None

    def student_x0(self, x: torch.Tensor, t: torch.Tensor, cond, added) -> torch.Tensor:
        """The student's output as LCMScheduler reads it: c_skip x + c_out x0_hat (c_skip ~ 0 at t >= 249)."""
        c_skip, c_out = (_view(c, x) for c in boundary_scalings(t, TIMESTEP_SCALING))
        return c_skip * x + c_out * self._x0(self.student, x, t, cond, added, self.prediction_type)

    def generate(self, shape, cond, added, generator: torch.Generator) -> torch.Tensor:
        """A student sample by backward simulation: a random number of its own steps without gradients,
        re-noised to the next timestep as the sampler does, then one step with gradients (when enabled)."""
        device, scheduler = self.device, self.parts.noise_scheduler
        count = len(self.timesteps)
        last = int(torch.randint(0, count, (1,), generator=generator, device=device).item())
        x = torch.randn(shape, generator=generator, device=device)
        for i in range(last):
            with torch.no_grad():
                t = torch.full((shape[0],), self.timesteps[i], device=device, dtype=torch.long)
                x0 = self.student_x0(x, t, cond, added)
                noise = torch.randn(shape, generator=generator, device=device)
                nxt = torch.full_like(t, self.timesteps[i + 1])
                x = scheduler.add_noise(x0, noise, nxt)
        t = torch.full((shape[0],), self.timesteps[last], device=device, dtype=torch.long)
        self._student_input = (x, t)
        self._student_taps.clear()  # the taps keep the first forward: this one's, for feature KD
        return self.student_x0(x, t, cond, added)

    def _dm_timesteps(self, size: int, generator: torch.Generator) -> torch.Tensor:
        total = self.parts.noise_scheduler.config.num_train_timesteps
        low, high = int(self.config.min_step * total), int(self.config.max_step * total)
        return torch.randint(low, high + 1, (size,), generator=generator, device=self.device)

    def _inputs(self, batch: dict[str, Any]):
        """The batch's latents, text conditions and SDXL added conditions, computed once per micro-batch.

        The engine hands every fake-score update of a step and then the student update the same batch;
        the frozen VAE (its latent mode) and text encoders would give the same tensors `fake_updates + 1`
        times. The student update is a batch's last use: `compute_loss` drops the entry.
        """
        hit = self._encoded.get(id(batch))
        if hit is not None and hit[0] is batch:  # the batch itself is held, so its id is not reused
            return hit[1]
        latents = self.latents(batch)
        cond = self.encode(batch)
        added = unet_added_conditions(cond, batch, self.device, torch.float32)
        if not self.train_text_encoders:  # trained encoders: each backward needs its own graph
            self._encoded[id(batch)] = (batch, (latents, cond, added))
        return latents, cond, added

    def real_x0(self, x, t, cond, added, batch) -> torch.Tensor:
        """The teacher's guided x0: uncond + g (cond - uncond), with any fake adapters switched off."""
        uncond = self.uncond(cond)
        uncond_added = unet_added_conditions(uncond, batch, self.device, torch.float32)
        kind, dtype = self.teacher_prediction, self.teacher_dtype
        off = adapters_disabled(self.teacher) if self.shared_base else contextlib.nullcontext()
        with torch.no_grad(), off:
            x0_c = self._x0(self.teacher, x, t, cond, added, kind, dtype)
            if self.guidance == 1.0:
                return x0_c
            x0_u = self._x0(self.teacher, x, t, uncond, uncond_added, kind, dtype)
        return x0_u + self.guidance * (x0_c - x0_u)

    def _features(self, x, t, cond, added) -> torch.Tensor:
        """The fake U-Net's bottleneck features of (x, t), what the GAN head classifies.

        Through the bare module, not DDP's wrapper: DDP allows one forward per backward (the denoising
        one in the fake update); gradients of this second use still reach the same parameters.
        """
        with self._mid_features() as mid:
            self._x0(_inner(self.fake_model), x, t, cond, added, self.teacher_prediction, self._fake_dtype())
        return mid.pop()

    # -- the losses ------------------------------------------------------------

    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The student's update: distribution matching, plus the GAN generator term and feature KD if on."""
        latents, cond, added = self._inputs(batch)
        self._encoded.pop(id(batch), None)
        x = self.generate(latents.shape, cond, added, generator)
        size = x.shape[0]
        t = self._dm_timesteps(size, generator)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        noisy = self.parts.noise_scheduler.add_noise(x.detach(), noise, t)
        x0_real = self.real_x0(noisy, t, cond, added, batch)
        with torch.no_grad():
            x0_fake = self._x0(
                _inner(self.fake_model), noisy, t, cond, added, self.teacher_prediction, self._fake_dtype()
            )
        grad = dm_gradient(x.detach().float(), x0_real, x0_fake)
        dm = dm_loss(x, grad)
        losses = {"dm": dm.detach()}
        loss = dm
        if self.gan is not None:
            t_gan = self._dm_timesteps(size, generator)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            noisy_x = self.parts.noise_scheduler.add_noise(x, noise, t_gan)
            logits = self.gan_model(self._features(noisy_x, t_gan, cond, added))
            gan = F.softplus(-logits).mean()
            loss = loss + self.config.gan_weight * gan
            losses["gan"] = gan.detach()
        if self.kd_pairs and self.config.kd_weight:
            kd = self._kd_loss(cond, added, x)
            loss = loss + self.config.kd_weight * kd
            losses["kd"] = kd.detach()
        return {"loss": loss, **losses}

    def _kd_loss(self, cond, added, like: torch.Tensor) -> torch.Tensor:
        """Block features of the student's last step against the teacher's at the same input."""
        x_in, t_in = self._student_input
        self._teacher_taps.clear()
        off = adapters_disabled(self.teacher) if self.shared_base else contextlib.nullcontext()
        with torch.no_grad(), off:
            self._x0(self.teacher, x_in, t_in, cond, added, self.teacher_prediction, self.teacher_dtype)
        s_feats, t_feats = self._student_taps.features, self._teacher_taps.features
        total = like.new_zeros((), dtype=torch.float32)
        for pair in self.kd_pairs:
            total = total + feature_mse(s_feats[pair.student], t_feats[pair.teacher])
        self._student_taps.clear()
        self._teacher_taps.clear()
        return total

    def fake_loss(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One fake-score update's loss: denoising on the student's samples (+ the GAN head's real/fake)."""
        self.fake_loss_calls += 1
        latents, cond, added = self._inputs(batch)
        with torch.no_grad():
            x = self.generate(latents.shape, cond, added, generator).float()
        scheduler, total = self.parts.noise_scheduler, self.parts.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, total, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        noisy = scheduler.add_noise(x, noise, t)
        dtype = self._fake_dtype()
        hidden = cond.hidden_states.to(dtype) if dtype is not None else cond.hidden_states.float()
        fake_added = added if added is None or dtype is None else {k: v.to(dtype) for k, v in added.items()}
        kwargs = {"added_cond_kwargs": fake_added} if fake_added is not None else {}
        inputs = noisy.to(dtype) if dtype is not None else noisy
        with self._mid_features() as mid:
            pred = self.fake_model(inputs, t, encoder_hidden_states=hidden, return_dict=False, **kwargs)[0]
        target = training_target(scheduler, x, noise, t, self.teacher_prediction)
        denoise = F.mse_loss(pred.float(), target.float())
        out = {"denoise": denoise.detach()}
        loss = denoise
        if self.gan is not None:
            fake_features = mid.pop()
            t_real = self._dm_timesteps(x.shape[0], generator)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            real_features = self._features(scheduler.add_noise(latents, noise, t_real), t_real, cond, added)
            # one call of the (DDP-wrapped) head for both: DDP allows one forward per backward
            fake_logits, real_logits = self.gan_model(torch.cat([fake_features, real_features])).chunk(2)
            gan = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
            loss = loss + self.config.gan_weight * gan
            out["gan"] = gan.detach()
        return {"loss": loss, **out}

    # -- results (validation pipeline, save, LoRA export: FewStepStudent) ------

    def close(self) -> None:
        """Remove the hooks (the modules may be reused after training)."""
        self._mid_hook.remove()
        self._student_taps.remove()
        self._teacher_taps.remove()


def _with_flag(make: Callable[[], Any], flag: str) -> Any:
    """Adapters for `flag`: the shared rank check names `--rank`; name the option the user gave instead."""
    try:
        return make()
    except SdcError as exc:
        raise SdcError(str(exc).replace("--rank", flag)) from None
