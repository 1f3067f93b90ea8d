"""Custom Diffusion folders and the samples diffusers gives with them.

Writes under tests/fixtures/custom_diffusion/, for the diffusers-made tiny model
(tests/fixtures/diffusers-made/model):

- `diffusers-kv/`: a folder as diffusers' `train_custom_diffusion.py` writes it
  (`unet.save_attn_procs` → `pytorch_custom_diffusion_weights.safetensors` with every attn2's
  `to_k_custom_diffusion` / `to_v_custom_diffusion`, plus `<new1>.safetensors` and
  `<new2>.safetensors` token files, metadata {"format": "pt"}), made from perturbed copies of the
  model's own K/V weights; `diffusers-qkvo/` the same with `--freeze_model crossattn`'s extra
  `to_q_custom_diffusion` and `to_out_custom_diffusion.0` (weight and bias);
- `imprint-kv/`: the folder imprint writes (`imprint concept convert --format diffusers` of a
  native concept holding whole K/V weights and two tokens), to check that diffusers reads it;
- `sample_*.safetensors` + `manifest.json`: DDIM 8-step guided sampling with each folder.

The trap DESIGN.md names: diffusers 0.42's `unet.load_attn_procs` parses such a file but applies it
only when given `_pipeline`. This script builds the processors with `unet._process_custom_diffusion`
itself, puts parameter-free `CustomDiffusionAttnProcessor`s on every other layer, sets them all,
and checks that every sample differs from the plain model's.

Usage: python tools/reference/custom_diffusion_files.py --imprint target/debug/imprint
"""

import argparse
import json
import os
import shutil
import subprocess

import torch
from safetensors.torch import load_file, save_file
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from transformers import CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests/fixtures/diffusers-made/model")
OUT = os.path.join(ROOT, "tests/fixtures/custom_diffusion")


def load_pipe():
    tok = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    pipe = StableDiffusionPipeline.from_pretrained(
        MODEL, safety_checker=None, requires_safety_checker=False, tokenizer=tok,
        scheduler=DDIMScheduler.from_pretrained(MODEL, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def training_processors(unet, train_q_out, seed):
    """The processors train_custom_diffusion.py builds, with weights moved off the model's."""
    torch.manual_seed(seed)
    procs = {}
    for name in unet.attn_processors:
        cross = name.endswith("attn2.processor")
        layer = unet.get_submodule(name[: -len(".processor")])
        if not cross:
            procs[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
            continue
        hidden = layer.to_q.out_features
        p = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=train_q_out, hidden_size=hidden,
                                         cross_attention_dim=layer.to_k.in_features)
        with torch.no_grad():
            p.to_k_custom_diffusion.weight.copy_(layer.to_k.weight + 0.3 * torch.randn_like(layer.to_k.weight))
            p.to_v_custom_diffusion.weight.copy_(layer.to_v.weight + 0.3 * torch.randn_like(layer.to_v.weight))
            if train_q_out:
                p.to_q_custom_diffusion.weight.copy_(layer.to_q.weight + 0.2 * torch.randn_like(layer.to_q.weight))
                o = p.to_out_custom_diffusion[0]
                o.weight.copy_(layer.to_out[0].weight + 0.2 * torch.randn_like(o.weight))
                o.bias.copy_(layer.to_out[0].bias + 0.1 * torch.randn_like(o.bias))
        procs[name] = p
    return procs


def write_tokens(folder, tokens):
    for name, row in tokens.items():
        save_file({name: row.contiguous()}, os.path.join(folder, f"{name}.safetensors"), metadata={"format": "pt"})


def apply_folder(pipe, folder):
    """Loads a Custom Diffusion folder into `pipe` as diffusers' own code paths allow."""
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors") and f != "pytorch_custom_diffusion_weights.safetensors":
            pipe.load_textual_inversion(folder, weight_name=f)
    state = load_file(os.path.join(folder, "pytorch_custom_diffusion_weights.safetensors"))
    procs = pipe.unet._process_custom_diffusion(state_dict=state)
    full = {}
    for name in pipe.unet.attn_processors:
        full[name] = procs.get(name, CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False))
    pipe.unet.set_attn_processor(full)


def sample(pipe, prompt, negative, init):
    with torch.no_grad():
        return pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.5,
                    latents=init.clone(), output_type="latent").images


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imprint", default=os.path.join(ROOT, "target/debug/imprint"))
    a = ap.parse_args()
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    torch.manual_seed(0)
    init = torch.randn(1, 4, 8, 8)
    dim = 24
    tokens = {"<new1>": torch.randn(dim) * 0.3, "<new2>": torch.randn(dim) * 0.3}
    pipe = load_pipe()
    # diffusers-written folders.
    for folder, q_out, seed in [("diffusers-kv", False, 1), ("diffusers-qkvo", True, 2)]:
        d = os.path.join(OUT, folder)
        os.makedirs(d)
        pipe.unet.set_attn_processor(training_processors(pipe.unet, q_out, seed))
        pipe.unet.save_attn_procs(d, weight_name="pytorch_custom_diffusion_weights.safetensors")
        write_tokens(d, tokens)
    # imprint-written folder: a native concept with whole K/V weights, converted by imprint.
    pipe = load_pipe()
    torch.manual_seed(3)
    tensors = {"text_encoder.token_embeddings": tokens["<new1>"].unsqueeze(0),
               "extra_tokens.<new2>": tokens["<new2>"].unsqueeze(0)}
    for name, mod in pipe.unet.named_modules():
        if name.endswith("attn2"):
            for p in ("to_k", "to_v"):
                w = getattr(mod, p).weight
                tensors[f"unet.{name}.{p}.weight_full"] = (w + 0.3 * torch.randn_like(w)).detach()
    native = os.path.join(OUT, "imprint-native.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, native,
              metadata={"imprint.format": "concept", "imprint.version": "1",
                        "imprint.method": "custom-diffusion", "imprint.trigger": "<new1>"})
    subprocess.run([a.imprint, "concept", "convert", native, os.path.join(OUT, "imprint-kv"),
                    "--format", "diffusers"], check=True)
    os.remove(native)

    runs = []
    cases = [("diffusers-kv", "a photo of <new1> cat on a table", None),
             ("diffusers-qkvo", "<new1> cat next to a <new2> chair", "blurry"),
             ("imprint-kv", "a photo of <new1> cat and <new2> chair", None)]
    for n, (folder, prompt, negative) in enumerate(cases):
        plain = sample(load_pipe(), prompt.replace("<new1> ", "").replace("<new2> ", ""), negative, init)
        pipe = load_pipe()
        apply_folder(pipe, os.path.join(OUT, folder))
        result = sample(pipe, prompt, negative, init)
        assert (result - plain).abs().max() > 1e-3, f"{folder}: the folder changed nothing"
        file = f"sample_{n}.safetensors"
        save_file({"latents": init, "expected": result.contiguous(), "plain": plain.contiguous()},
                  os.path.join(OUT, file))
        runs.append({"file": file, "folder": folder, "prompt": prompt, "negative_prompt": negative,
                     "scheduler": "ddim", "steps": 8, "guidance": 7.5})
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"model": "diffusers-made", "runs": runs}, f, indent=1)
    print(f"wrote {len(runs)} runs to {OUT}")


if __name__ == "__main__":
    main()
