"""Concept-file fixtures and textual-inversion sampling references, made with diffusers.

Writes under tests/fixtures/concepts/:

- `learned_embeds.safetensors` / `.bin`: a 2-vector diffusers textual-inversion file for the `tiny`
  model (dim 32), made the way diffusers' examples/textual_inversion/textual_inversion.py makes it:
  placeholder tokens `<cat-toy>`, `<cat-toy>_1` added to the tokenizer, the embedding table
  resized, and the rows `[first_id ..= last_id]` saved as `{"<cat-toy>": [2, 32]}` with metadata
  `{"format": "pt"}`;
- `pt-toy.pt`: an Automatic1111 embedding (torch.save of A1111's dict, 1 vector), and
  `pt-toy-emb-params.safetensors`, the same vector as kohya/A1111 `emb_params`;
- `old-style.pt` (`string_to_param` as a `torch.nn.ParameterDict`, as the original textual
  inversion code saved it) and `old-style-expected.safetensors`;
- `strided.pt` (`emb_params` saved as a strided view of a larger storage) and
  `strided-expected.safetensors`;
- `malicious.pt`: a pickle whose `__reduce__` calls `os.system` to create
  /tmp/imprint-pickle-marker (the tests check that loading it is refused and the marker absent);
- `sample_*.safetensors` + `manifest.json`: 8-step DDIM guided sampling on the `tiny` model after
  `pipe.load_textual_inversion(...)`, from fixed initial latents, `output_type="latent"`.

Pinned versions (tools/reference/requirements.txt): torch 2.15.0, diffusers 0.42.1,
transformers 5.24.0, safetensors 0.8.0. Usage:
    python tools/reference/concept_files.py --imprint target/debug/imprint
"""

import argparse
import json
import os
import subprocess
import tempfile

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

MARKER = "/tmp/imprint-pickle-marker"


class Payload:
    """What a malicious embedding does: unpickling calls os.system."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def load_strict(cls, path, **kw):
    model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"{path}: weights do not match the reference architecture: {bad}")
    return model.eval()


def diffusers_embeds(model, out):
    """A textual-inversion result saved as diffusers' training script saves it."""
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = load_strict(CLIPTextModel, model, subfolder="text_encoder")
    placeholder = "<cat-toy>"
    tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, 2)]
    assert tokenizer.add_tokens(tokens) == len(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        # "Trained" vectors: random, at a scale like the table's.
        weight[ids] = torch.randn(len(ids), weight.shape[1]) * weight.std()
    learned = weight[min(ids): max(ids) + 1].detach().cpu()
    save_file({placeholder: learned.contiguous()}, os.path.join(out, "learned_embeds.safetensors"),
              metadata={"format": "pt"})
    torch.save({placeholder: learned.clone()}, os.path.join(out, "learned_embeds.bin"))


def a1111_files(dim, out):
    vec = (torch.randn(1, dim) * 0.3).requires_grad_(True)
    # As A1111's Embedding.save writes it (modules/textual_inversion/textual_inversion.py).
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "pt-toy",
                "step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny"},
               os.path.join(out, "pt-toy.pt"))
    save_file({"emb_params": vec.detach().contiguous()}, os.path.join(out, "pt-toy-emb-params.safetensors"))

    # The original textual-inversion code (rinongal/textual_inversion), and so early A1111 files,
    # saved string_to_param as a torch.nn.ParameterDict module.
    old = torch.randn(2, dim)
    torch.save({"string_to_token": {"*": 265},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(old.clone())})},
               os.path.join(out, "old-style.pt"))
    save_file({"emb_params": old.contiguous()}, os.path.join(out, "old-style-expected.safetensors"))

    base = torch.randn(dim + 8, 3)
    view = base[4:4 + dim].t()  # [3, dim], stride (1, 3), storage offset 12
    torch.save({"emb_params": view}, os.path.join(out, "strided.pt"))
    save_file({"emb_params": view.contiguous()}, os.path.join(out, "strided-expected.safetensors"))

    torch.save({"emb_params": torch.zeros(1, dim), "payload": Payload()}, os.path.join(out, "malicious.pt"))


def sampling(model, out):
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = load_strict(CLIPTextModel, model, subfolder="text_encoder")
    unet = load_strict(UNet2DConditionModel, model, subfolder="unet")
    vae = load_strict(AutoencoderKL, model, subfolder="vae")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_pretrained(model, subfolder="scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    runs = []
    cases = [
        # (files applied before this run, prompt, negative prompt)
        (["learned_embeds.safetensors"], "a photo of a <cat-toy> on a table", None),
        (["learned_embeds.safetensors", "pt-toy.pt"], "a <cat-toy> next to a pt-toy, oil painting",
         "blurry <cat-toy>"),
    ]
    loaded = set()
    for i, (files, prompt, negative) in enumerate(cases):
        for f in files:
            if f in loaded:
                continue
            # A1111 files are named after their file stem (as A1111 does); diffusers would use the
            # `name` field, so the token is passed explicitly.
            token = None if f.endswith(".safetensors") else os.path.splitext(f)[0]
            pipe.load_textual_inversion(os.path.join(out, f), token=token)
            loaded.add(f)
        init = torch.randn(1, 4, 8, 8)
        with torch.no_grad():
            result = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.5,
                          latents=init.clone(), output_type="latent").images
        file = f"sample_{i}.safetensors"
        save_file({"latents": init, "expected": result.contiguous()}, os.path.join(out, file))
        runs.append({"file": file, "concepts": files, "prompt": prompt, "negative_prompt": negative,
                     "scheduler": "ddim", "steps": 8, "guidance": 7.5,
                     "expanded_prompt": pipe.maybe_convert_prompt(prompt, pipe.tokenizer)})
    return runs, float(sum(p.detach().double().abs().sum() for p in unet.parameters()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imprint", default="target/debug/imprint")
    ap.add_argument("--out", default="tests/fixtures/concepts")
    a = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(4321)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        model = os.path.join(work, "tiny")
        subprocess.run([os.path.abspath(a.imprint), "model", "init", "--config", "tiny", "--out", model,
                        "--seed", "0"], check=True)
        dim = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").config.hidden_size
        diffusers_embeds(model, a.out)
        a1111_files(dim, a.out)
        runs, fingerprint = sampling(model, a.out)
    manifest = {"config": "tiny", "seed": 0, "dim": dim, "unet_weight_abs_sum": fingerprint, "sampling": runs,
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "transformers": __import__("transformers").__version__}}
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote concept fixtures to {a.out}")


if __name__ == "__main__":
    main()
