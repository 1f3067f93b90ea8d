"""Reference outputs for imprint's parity tests, computed with diffusers/transformers.

For each tiny architecture (`tiny`: SD 1.x-like; `tiny-sd2`: SD 2.x-like, v-prediction, linear
projections, per-block heads, gelu, "!" padding) this script

1. has imprint write the random-weight model folder (`imprint model init --config C --seed 0`),
   so the weights need not be committed: `cargo test` rebuilds the identical folder;
2. loads that folder with diffusers/transformers, strictly (a missing or unexpected weight fails);
3. saves inputs and the reference's outputs for the tokenizer, text encoder, UNet, VAE encoder and
   decoder, and 8-step guided sampling with every scheduler, under tests/fixtures/<config>/.

Pinned versions: tools/reference/requirements.txt. Usage:
    python tools/reference/make_fixtures.py --imprint target/debug/imprint
"""

import argparse
import json
import os
import subprocess
import tempfile

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

PROMPTS = ["a photo of a cat", "An oil PAINTING of a dog, wearing a hat!!"]
SAMPLERS = [
    # (name, scheduler class, extra config, --karras)
    ("ddim", DDIMScheduler, {}, False),
    ("euler", EulerDiscreteScheduler, {}, False),
    ("euler-a", EulerAncestralDiscreteScheduler, {}, False),
    ("dpm++2m", DPMSolverMultistepScheduler, {}, False),
    ("dpm++2m", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, True),
    ("euler", EulerDiscreteScheduler, {"use_karras_sigmas": True}, True),
    ("ddpm", DDPMScheduler, {}, False),
]


def load_strict(cls, path, **kw):
    model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"{path}: weights do not match the reference architecture: {bad}")
    return model.eval()


class QueuedRandn:
    """Stands in for diffusers' randn_tensor inside a scheduler: returns seeded noise and keeps it."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        t = torch.randn(shape, generator=self.gen, dtype=torch.float32)
        self.drawn.append(t.clone())
        return t.to(dtype=dtype or torch.float32)


def small_clip_vocab(folder, size=1000):
    """A CLIP BPE vocabulary of `size` tokens (the real one's first merges), as small test models
    ship: byte tokens, byte+</w> tokens, the first merges, then the two special tokens."""
    import gzip
    import json as js
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    gz = os.path.join(os.path.dirname(__file__), "../../crates/models/assets/bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1:]
    n_merges = size - 512 - 2
    merges = [tuple(m.split()) for m in merges[:n_merges]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        js.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def build_diffusers_made(model):
    """A tiny pipeline written entirely by diffusers/transformers (not by imprint): other widths,
    depths and head counts, two transformer layers in a block, a 1000-token vocabulary, gelu, the
    modern eos id, a factor-2 VAE, trailing DDIM spacing and v-prediction."""
    from transformers import CLIPTextConfig
    torch.manual_seed(99)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), transformer_layers_per_block=(2, 1),
        norm_num_groups=8, upcast_attention=True, flip_sin_to_cos=False, freq_shift=1)
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16, scaling_factor=0.13025)
    work_tok = os.path.join(model + "-tok")
    tokenizer = small_clip_vocab(work_tok)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="gelu", bos_token_id=998, eos_token_id=999, pad_token_id=999, max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                              prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(model)


def fixtures_for(config, imprint, out_root, work):
    out = os.path.join(out_root, config)
    os.makedirs(out, exist_ok=True)
    if config == "diffusers-made":
        model = os.path.join(out, "model")
        build_diffusers_made(model)
    else:
        model = os.path.join(work, config)
        subprocess.run([imprint, "model", "init", "--config", config, "--out", model, "--seed", "0"], check=True)
    torch.manual_seed(1234)

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = load_strict(CLIPTextModel, model, subfolder="text_encoder")
    unet = load_strict(UNet2DConditionModel, model, subfolder="unet")
    vae = load_strict(AutoencoderKL, model, subfolder="vae")
    manifest = {"config": config, "seed": 0, "versions": {
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": __import__("transformers").__version__}}

    # A fingerprint of the weights: the tests check that `model init` still writes these.
    manifest["unet_weight_abs_sum"] = float(sum(p.detach().double().abs().sum() for p in unet.parameters()))

    with torch.no_grad():
        ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        manifest["prompts"] = PROMPTS
        manifest["input_ids"] = ids.tolist()
        te = text_encoder(ids)
        save_file({"input_ids": ids.to(torch.int64).contiguous(),
                   "last_hidden_state": te.last_hidden_state.contiguous(),
                   "pooler_output": te.pooler_output.contiguous()}, os.path.join(out, "text_encoder.safetensors"))

        d = unet.config.cross_attention_dim
        sample = torch.randn(2, 4, 8, 8)
        timestep = torch.tensor([10.0, 981.0])
        ehs = torch.randn(2, 77, d)
        y = unet(sample, timestep, encoder_hidden_states=ehs).sample
        save_file({"sample": sample, "timestep": timestep, "encoder_hidden_states": ehs, "expected": y.contiguous()},
                  os.path.join(out, "unet.safetensors"))
        # Odd latent size: exercises the explicit upsample sizes.
        sample_odd = torch.randn(1, 4, 6, 10)
        y_odd = unet(sample_odd, torch.tensor([500]), encoder_hidden_states=ehs[:1]).sample
        save_file({"sample": sample_odd, "timestep": torch.tensor([500], dtype=torch.int64),
                   "encoder_hidden_states": ehs[:1].contiguous(), "expected": y_odd.contiguous()},
                  os.path.join(out, "unet_odd.safetensors"))

        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        dist = vae.encode(pixels).latent_dist
        save_file({"sample": pixels, "mean": dist.mean.contiguous(), "logvar": dist.logvar.contiguous()},
                  os.path.join(out, "vae_encoder.safetensors"))
        latents = torch.randn(1, 4, 8, 8)
        dec = vae.decode(latents).sample
        save_file({"latents": latents, "expected": dec.contiguous()}, os.path.join(out, "vae_decoder.safetensors"))

        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler.from_pretrained(model, subfolder="scheduler"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        runs = []
        for i, (name, cls, extra, karras) in enumerate(SAMPLERS):
            scheduler = cls.from_pretrained(model, subfolder="scheduler", **extra)
            pipe.scheduler = scheduler
            module = __import__(cls.__module__, fromlist=["randn_tensor"])
            queued = QueuedRandn(100 + i)
            original = getattr(module, "randn_tensor", None)
            if original is not None:
                module.randn_tensor = queued
            try:
                init = torch.randn(1, 4, 8, 8)
                negative = "blurry, low quality" if i % 2 else None
                result = pipe(prompt=PROMPTS[i % 2], negative_prompt=negative, num_inference_steps=8,
                              guidance_scale=7.5, latents=init.clone(), output_type="latent").images
            finally:
                if original is not None:
                    module.randn_tensor = original
            tensors = {"latents": init, "expected": result.contiguous()}
            if queued.drawn:
                tensors["noise"] = torch.stack(queued.drawn)
            file = f"sample_{i}.safetensors"
            save_file(tensors, os.path.join(out, file))
            runs.append({"file": file, "scheduler": name, "karras": karras, "prompt": PROMPTS[i % 2],
                         "negative_prompt": negative, "steps": 8, "guidance": 7.5})
        manifest["sampling"] = runs
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote fixtures for {config} to {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imprint", default="target/debug/imprint")
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--configs", nargs="+", default=["tiny", "tiny-sd2", "diffusers-made"])
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as work:
        for c in a.configs:
            fixtures_for(c, os.path.abspath(a.imprint), a.out, work)


if __name__ == "__main__":
    main()
