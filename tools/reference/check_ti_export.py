"""Checks that a textual-inversion concept trained by imprint, exported to diffusers' and A1111's
formats, loads in diffusers and samples the same latents as imprint.

    python tools/reference/check_ti_export.py --imprint target/debug/imprint --model DIR --concept FILE --token "<red-toy>"

Exits non-zero if imprint's `debug sample --concept` and diffusers' `load_textual_inversion` differ
by more than DESIGN.md's sampling tolerance (1e-3 relative).
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

from diffusers import DDIMScheduler, StableDiffusionPipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imprint", default="target/debug/imprint")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concept", required=True)
    ap.add_argument("--token", required=True)
    a = ap.parse_args()
    work = tempfile.mkdtemp()
    prompt = f"a photo of {a.token} on a beach"
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents_file = os.path.join(work, "in.safetensors")
    save_file({"latents": init}, latents_file)
    ours_file = os.path.join(work, "ours.safetensors")
    subprocess.run([a.imprint, "debug", "sample", "--model", a.model, "--prompt", prompt, "--scheduler", "ddim",
                    "--steps", "8", "--guidance", "7.5", "--latents", latents_file, "--output", ours_file,
                    "--concept", a.concept], check=True)
    ours = load_file(ours_file)["latents"]
    worst = 0.0
    for fmt in ["diffusers", "a1111"]:
        name = a.token if fmt == "a1111" else "learned_embeds"
        exported = os.path.join(work, f"{name}.safetensors")
        subprocess.run([a.imprint, "concept", "convert", a.concept, exported, "--format", fmt], check=True)
        pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_textual_inversion(exported, token=a.token)
        ref = pipe(prompt=prompt, num_inference_steps=8, guidance_scale=7.5, latents=init.clone(),
                   output_type="latent").images
        err = ((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()
        print(f"{fmt}: relative difference {err:.2e}")
        worst = max(worst, err)
    sys.exit(0 if worst <= 1e-3 else 1)


if __name__ == "__main__":
    main()
