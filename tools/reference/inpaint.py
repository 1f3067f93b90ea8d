"""Inpainting references: diffusers' StableDiffusionInpaintPipeline on a regular (4-channel UNet)
and an inpainting (9-channel UNet) tiny model, from given noise, mask, and image / masked-image
latents (so no VAE sampling noise enters the comparison).

Writes under tests/fixtures/inpaint/:

- `model-9ch/`: the diffusers-made tiny pipeline (tests/fixtures/diffusers-made/model) with a
  UNet of 9 input channels (noisy latents, mask, masked-image latents), built by diffusers;
- `mask.png`: a 16×16 mask (the models' VAE downsamples by 2), white = repaint, with grays on
  both sides of 0.5;
- `case_*.safetensors` (`latents` = unit noise, `image_latents`, `masked_image_latents`,
  `expected`, `plain`) + `manifest.json`: 8-step guided sampling with
  `pipe(image=image_latents, mask_image=mask, masked_image_latents=…, latents=noise,
  strength=…, output_type="latent")` for both model kinds, DDIM and Euler.

Usage: python tools/reference/inpaint.py   (pinned versions: tools/reference/requirements.txt)
"""

import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionInpaintPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tests/fixtures/diffusers-made/model")
OUT = os.path.join(ROOT, "tests/fixtures/inpaint")


def build_9ch(path):
    shutil.copytree(SOURCE, path)
    config = dict(UNet2DConditionModel.load_config(os.path.join(SOURCE, "unet")))
    config["in_channels"] = 9
    torch.manual_seed(21)
    unet = UNet2DConditionModel.from_config(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    shutil.rmtree(os.path.join(path, "unet"))
    unet.save_pretrained(os.path.join(path, "unet"))


def load(path, scheduler):
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False,
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        scheduler=cls.from_pretrained(path, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    model9 = os.path.join(OUT, "model-9ch")
    build_9ch(model9)
    # A mask with a repaint rectangle and gray levels either side of the 0.5 threshold.
    m = np.zeros((16, 16), dtype=np.uint8)
    m[3:12, 5:14] = 255
    m[0, :] = 127
    m[15, :] = 129
    Image.fromarray(m, mode="L").convert("RGB").save(os.path.join(OUT, "mask.png"))
    mask = Image.open(os.path.join(OUT, "mask.png"))
    runs = []
    cases = [("diffusers-made", "ddim", 1.0), ("diffusers-made", "ddim", 0.6), ("diffusers-made", "euler", 0.75),
             ("model-9ch", "ddim", 1.0), ("model-9ch", "euler", 0.5)]
    for n, (model, scheduler, strength) in enumerate(cases):
        path = SOURCE if model == "diffusers-made" else model9
        torch.manual_seed(100 + n)
        noise = torch.randn(1, 4, 8, 8)
        image_latents = torch.randn(1, 4, 8, 8)
        masked_latents = torch.randn(1, 4, 8, 8)
        prompt, negative = "a photo of a cat on a table", "blurry"
        kw = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.5,
                  height=16, width=16, output_type="latent")
        pipe = load(path, scheduler)
        with torch.no_grad():
            result = pipe(image=image_latents.clone(), mask_image=mask, masked_image_latents=masked_latents.clone(),
                          latents=noise.clone(), strength=strength, **kw).images
            # The same run with an all-black mask (nothing to repaint) must differ.
            blank = Image.fromarray(np.zeros((16, 16), dtype=np.uint8), mode="L")
            plain = pipe(image=image_latents.clone(), mask_image=blank, masked_image_latents=masked_latents.clone(),
                         latents=noise.clone(), strength=strength, **kw).images
        assert (result - plain).abs().max() > 1e-3, f"case {n}: the mask changed nothing"
        file = f"case_{n}.safetensors"
        save_file({"latents": noise, "image_latents": image_latents, "masked_image_latents": masked_latents,
                   "expected": result.contiguous(), "plain": plain.contiguous()}, os.path.join(OUT, file))
        runs.append({"file": file, "model": model, "scheduler": scheduler, "strength": strength,
                     "prompt": prompt, "negative_prompt": negative, "steps": 8, "guidance": 7.5})
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    print(f"wrote {len(runs)} runs to {OUT}")


if __name__ == "__main__":
    main()
