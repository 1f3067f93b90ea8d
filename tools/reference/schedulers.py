"""Reference fixture for imprint's noise schedulers.

Runs diffusers' schedulers through a full sampling loop with a synthetic, deterministic "model"
and fixed noise, and saves timesteps, init_noise_sigma, add_noise at step index 3, the final
latents of an img2img run continuing from there, and the final latents of the full run to
tests/fixtures/schedulers.safetensors (configs and case list in schedulers.json).

Pinned versions: python 3.11, torch 2.15.0, diffusers 0.42.1, numpy, safetensors.
Run: /work/refvenv/bin/python tools/reference/schedulers.py
"""

import json
import pathlib

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures"
STEPS = 8
SHAPE = (1, 4, 8, 8)

_sd = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
CONFIGS = {
    "sd15": dict(_sd),
    "sd2v": dict(_sd, prediction_type="v_prediction"),
    # trailing spacing with the default linear betas
    "trailing": dict(_sd, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing"),
    # linspace spacing with cosine betas (exercises fractional Euler timesteps and unrounded DPM Karras ones)
    "linspace_cos": dict(_sd, beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", steps_offset=0),
}
KINDS = [
    ("ddim", DDIMScheduler, False),
    ("euler", EulerDiscreteScheduler, False),
    ("euler", EulerDiscreteScheduler, True),
    ("euler-a", EulerAncestralDiscreteScheduler, False),
    ("dpm++2m", DPMSolverMultistepScheduler, False),
    ("dpm++2m", DPMSolverMultistepScheduler, True),
    ("ddpm", DDPMScheduler, False),
]


def model(x, t):
    """Synthetic denoiser: depends on both the sample and the timestep."""
    return torch.tanh(0.5 * x) * (1.0 + float(t) / 1000.0)


class NoiseQueue:
    """Stands in for diffusers' randn_tensor: hands out the precomputed noise in order."""

    def __init__(self, noises):
        self.noises = list(noises)
        self.used = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        n = self.noises[self.used]
        assert tuple(n.shape) == tuple(shape)
        self.used += 1
        return n.clone().to(dtype=dtype or torch.float32)


def main():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(SHAPE, generator=g)
    noises = [torch.randn(SHAPE, generator=g) for _ in range(STEPS)]
    original = torch.randn(SHAPE, generator=g)
    add_noise_noise = torch.randn(SHAPE, generator=g)

    tensors = {"init": init, "original": original, "add_noise_noise": add_noise_noise}
    for i, n in enumerate(noises):
        tensors[f"noise.{i}"] = n
    cases = []
    for cname, cfg in CONFIGS.items():
        for kind, cls, karras in KINDS:
            name = f"{cname}.{kind}{'.karras' if karras else ''}"
            conf = dict(cfg, use_karras_sigmas=karras)
            sched = cls.from_config(conf)
            sched.set_timesteps(STEPS)
            queue = NoiseQueue(noises)
            scheduling_ddpm.randn_tensor = queue
            scheduling_euler_ancestral_discrete.randn_tensor = queue
            if hasattr(sched, "set_begin_index"):
                # Our schedulers are driven by step index; without this diffusers locates the first
                # step by timestep value, which picks the wrong index when Karras rounding repeats it.
                sched.set_begin_index(0)
            latents = init * sched.init_noise_sigma
            for t in sched.timesteps:
                inp = sched.scale_model_input(latents, t)
                latents = sched.step(model(inp, t), t, latents).prev_sample

            fresh = cls.from_config(conf)
            fresh.set_timesteps(STEPS)
            if hasattr(fresh, "set_begin_index"):
                fresh.set_begin_index(3)
            noisy = fresh.add_noise(original, add_noise_noise, fresh.timesteps[3:4])
            # img2img: continue from the noised latents at step index 3, as the img2img pipeline does.
            queue2 = NoiseQueue(noises)
            scheduling_ddpm.randn_tensor = queue2
            scheduling_euler_ancestral_discrete.randn_tensor = queue2
            x = noisy
            for t in fresh.timesteps[3:]:
                inp = fresh.scale_model_input(x, t)
                x = fresh.step(model(inp, t), t, x).prev_sample
            tensors[f"{name}.img2img"] = x.float()

            tensors[f"{name}.timesteps"] = sched.timesteps.to(torch.float64)
            tensors[f"{name}.init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)
            tensors[f"{name}.final"] = latents.float()
            tensors[f"{name}.add_noise"] = noisy.float()
            cases.append(
                dict(
                    name=name,
                    config=cname,
                    kind=kind,
                    karras=karras,
                    noise_used=queue.used,
                    img2img_noise_used=queue2.used,
                )
            )

    # Training side: alphas_cumprod, per-sample add_noise and velocity for the SD config.
    ddpm = DDPMScheduler.from_config(CONFIGS["sd15"])
    x0 = torch.randn((2, 4, 8, 8), generator=g)
    eps = torch.randn((2, 4, 8, 8), generator=g)
    ts = torch.tensor([10, 700], dtype=torch.int64)
    tensors["train.alphas_cumprod"] = ddpm.alphas_cumprod.float()
    tensors["train.x0"] = x0
    tensors["train.noise"] = eps
    tensors["train.timesteps"] = ts.to(torch.float64)
    tensors["train.add_noise"] = ddpm.add_noise(x0, eps, ts)
    tensors["train.velocity"] = ddpm.get_velocity(x0, eps, ts)

    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / "schedulers.safetensors"))
    meta = dict(steps=STEPS, configs=CONFIGS, cases=cases, train=dict(config="sd15", timesteps=[10, 700]))
    (OUT / "schedulers.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(cases)} cases, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
