"""One textual-inversion training step as diffusers' examples/textual_inversion/textual_inversion.py
computes it, for imprint's training-parity test.

Same tiny model as the other fixtures (`imprint model init --config C --seed 0`), a 2-vector
placeholder initialized from "toy", fixed latents / noise / timestep: saves the loss, the gradient on
the new embedding rows and the rows after one AdamW step to tests/fixtures/<config>/ti_step.safetensors.
Pinned versions: tools/reference/requirements.txt.

    python tools/reference/ti_step.py --imprint target/debug/imprint
"""

import argparse
import json
import os
import subprocess
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

TOKEN, INIT_WORD, NUM_VECTORS = "<cat-toy>", "toy", 2
LR = 5e-3


def step_fixture(config, imprint, out_root, work):
    model = os.path.join(work, config)
    subprocess.run([imprint, "model", "init", "--config", config, "--out", model, "--seed", "0"], check=True)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")

    # As the script: add the placeholder tokens, resize, initialize from the init word.
    tokens = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, NUM_VECTORS)]
    assert tokenizer.add_tokens(tokens) == NUM_VECTORS
    init_id = tokenizer.encode(INIT_WORD, add_special_tokens=False)
    assert len(init_id) == 1
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i in ids:
            table[i] = table[init_id[0]].clone()
    initial = table[ids].detach().clone()

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    text_encoder.get_input_embeddings().requires_grad_(True)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=LR,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    text_encoder.train()

    g = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    timesteps = torch.tensor([637], dtype=torch.int64)
    caption = f"a photo of a {' '.join(tokens)}"
    input_ids = tokenizer(caption, padding="max_length", truncation=True,
                          max_length=tokenizer.model_max_length, return_tensors="pt").input_ids

    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    states = text_encoder(input_ids)[0]
    pred = unet(noisy, timesteps, states).sample
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss.backward()
    grad = table.grad[ids].detach().clone()
    optimizer.step()
    updated = table[ids].detach().clone()

    out = os.path.join(out_root, config)
    os.makedirs(out, exist_ok=True)
    save_file({"latents": latents, "noise": noise, "timesteps": timesteps, "input_ids": input_ids,
               "initial": initial, "loss": loss.detach().reshape(1), "grad": grad, "updated": updated},
              os.path.join(out, "ti_step.safetensors"),
              metadata={"token": TOKEN, "init_word": INIT_WORD, "num_vectors": str(NUM_VECTORS),
                        "lr": repr(LR), "caption": caption})
    print(f"{config}: loss {loss.item():.6f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imprint", default="target/debug/imprint")
    ap.add_argument("--out", default="tests/fixtures")
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as work:
        for c in ["tiny", "tiny-sd2"]:
            step_fixture(c, os.path.abspath(a.imprint), a.out, work)


if __name__ == "__main__":
    main()
