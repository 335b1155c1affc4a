"""DMD2's mathematics without images: a 2-D mixture of 8 Gaussians with an exact teacher score.

A small MLP student (noise -> point, one step) is trained by distribution matching against the exact
x0 estimate of the noised mixture, with an MLP fake score that learns the student's distribution by
denoising (`--fake-updates` updates per student update). The loss is the project's own
(`training.dmd_task.dm_gradient`, `dm_loss`). Printed: the sliced-Wasserstein distance to the target
before and after, the modes covered, and the fake score's denoising error (beyond the exact target
score's) on student samples against target samples: lower on the student's, since it learned the
student's distribution, not the target; and the same errors plain (not relative to the exact score).

    python benchmarks/dmd_toy.py --seed 0
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch

from sdcompress.training.dmd_task import dm_gradient, dm_loss

MODES, RADIUS, STD = 8, 2.0, 0.1


def centres() -> torch.Tensor:
    angles = torch.arange(MODES) * (2 * math.pi / MODES)
    return RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def sample_target(n: int, generator: torch.Generator) -> torch.Tensor:
    index = torch.randint(0, MODES, (n,), generator=generator)
    return centres()[index] + STD * torch.randn(n, 2, generator=generator)


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A variance-preserving schedule on t in [0, 1]: x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps."""
    return (t * math.pi / 2).cos()[:, None], (t * math.pi / 2).sin()[:, None]


def exact_x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] of the noised mixture, in closed form (the teacher's x0 estimate, with no error)."""
    a, s = alpha_sigma(t)
    mu = centres()  # [K, 2]
    var = a**2 * STD**2 + s**2  # [N, 1]
    d2 = ((x[:, None, :] - a[:, None, :] * mu[None]) ** 2).sum(-1)  # [N, K]
    resp = torch.softmax(-d2 / (2 * var), dim=1)
    gain = a * STD**2 / var  # posterior of each component: mu + gain (x - a mu)
    per = mu[None] + gain[:, None, :] * (x[:, None, :] - a[:, None, :] * mu[None])
    return (resp[..., None] * per).sum(1)


def mlp(inputs: int, width: int = 128) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, width),
        torch.nn.SiLU(),
        torch.nn.Linear(width, 2),
    )


class FakeScore(torch.nn.Module):
    """x0 estimate from (x_t, t), written as a correction of the input so early training is stable."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, dirs: int = 128
) -> float:
    """Mean over random directions of the 1-D Wasserstein-1 distance of the projections."""
    theta = torch.randn(2, dirs, generator=generator)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values
    return float((pa - pb).abs().mean())


def modes_covered(x: torch.Tensor, share: float = 0.02) -> int:
    """Modes with at least `share` of the samples within 4 standard deviations of their centre."""
    d = torch.cdist(x, centres())
    return int(((d < 4 * STD).float().mean(0) >= share).sum())


@dataclass
class ToyResult:
    seed: int
    steps: int
    seconds: float
    sw_start: float
    sw_end: float
    modes: int
    fake_error_student: float  # excess over the exact target score's error on the same noised samples
    fake_error_target: float
    fake_plain_student: float  # the fake score's plain denoising error
    fake_plain_target: float

    @property
    def sw_ratio(self) -> float:
        return self.sw_start / max(self.sw_end, 1e-12)


def denoising_errors(fake: FakeScore, x0: torch.Tensor, generator: torch.Generator) -> tuple[float, float]:
    """The fake score's and the exact target score's denoising errors on the same noised samples of `x0`.

    Low noise only (t <= 0.4): at high noise the error every denoiser must make swamps the difference.
    """
    t = 0.02 + 0.38 * torch.rand(x0.shape[0], generator=generator)
    a, s = alpha_sigma(t)
    noisy = a * x0 + s * torch.randn(x0.shape, generator=generator)
    with torch.no_grad():
        fake_mse = ((fake(noisy, t) - x0) ** 2).sum(1).mean()
        real_mse = ((exact_x0(noisy, t) - x0) ** 2).sum(1).mean()
    return float(fake_mse), float(real_mse)


def excess_error(fake: FakeScore, x0: torch.Tensor, generator: torch.Generator) -> float:
    """The fake score's denoising error minus the exact target score's (`denoising_errors`).

    On target samples the exact score is the best denoiser there is, so the excess is positive; on the
    student's samples a fake score that learned the student's distribution beats it (lower excess).
    """
    fake_mse, real_mse = denoising_errors(fake, x0, generator)
    return fake_mse - real_mse


def run(seed: int = 0, steps: int = 300, fake_updates: int = 5, batch: int = 256) -> ToyResult:
    """Train the toy student; every draw comes from generators seeded by `seed`."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    student, fake = mlp(2), FakeScore()
    opt_g = torch.optim.Adam(student.parameters(), lr=1e-3)
    opt_f = torch.optim.Adam(fake.parameters(), lr=2e-3)
    evaluate = torch.Generator().manual_seed(10_000 + seed)
    target = sample_target(4000, evaluate)
    z_eval = torch.randn(4000, 2, generator=evaluate)
    with torch.no_grad():
        sw_start = sliced_wasserstein(student(z_eval), target, torch.Generator().manual_seed(1))
    started = time.perf_counter()
    for _ in range(steps):
        for _ in range(fake_updates):  # the two time-scale rule: the fake score tracks the student
            with torch.no_grad():
                x = student(torch.randn(batch, 2, generator=gen))
            t = torch.rand(batch, generator=gen)
            a, s = alpha_sigma(t)
            noisy = a * x + s * torch.randn(x.shape, generator=gen)
            loss_f = ((fake(noisy, t) - x) ** 2).mean()
            opt_f.zero_grad()
            loss_f.backward()
            opt_f.step()
        x = student(torch.randn(batch, 2, generator=gen))
        t = 0.02 + 0.96 * torch.rand(batch, generator=gen)
        a, s = alpha_sigma(t)
        noisy = a * x.detach() + s * torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            grad = dm_gradient(x.detach(), exact_x0(noisy, t), fake(noisy, t))
        loss_g = dm_loss(x, grad)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        samples = student(z_eval)
    sw_end = sliced_wasserstein(samples, target, torch.Generator().manual_seed(1))
    err = torch.Generator().manual_seed(20_000 + seed)
    state = err.get_state()
    on_student = denoising_errors(fake, samples, err)
    err.set_state(state)  # the same noise and timesteps for both: only the samples differ
    on_target = denoising_errors(fake, target, err)
    return ToyResult(
        seed,
        steps,
        seconds,
        sw_start,
        sw_end,
        modes_covered(samples),
        on_student[0] - on_student[1],
        on_target[0] - on_target[1],
        on_student[0],
        on_target[0],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--fake-updates", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "seed  steps  seconds  SW start  SW end  ratio  modes  fake excess err (student)  (target)"
        "  fake plain err (student)  (target)"
    )
    for seed in args.seed:
        r = run(seed, args.steps, args.fake_updates)
        print(
            f"{r.seed:>4}  {r.steps:>5}  {r.seconds:7.1f}  {r.sw_start:8.3f}  {r.sw_end:6.3f}  "
            f"{r.sw_ratio:5.1f}x  {r.modes}/{MODES}  {r.fake_error_student:25.4f}  {r.fake_error_target:8.4f}"
            f"  {r.fake_plain_student:24.4f}  {r.fake_plain_target:8.4f}"
        )


if __name__ == "__main__":
    main()
