"""IP-Adapter references (Ye et al. 2023): diffusers' StableDiffusionPipeline with `load_ip_adapter` on
the diffusers-made tiny model (tests/fixtures/diffusers-made/model), 8-step classifier-free-guided
sampling from given noise.

Writes under tests/fixtures/ip_adapter/:

- `image_encoder/`: a tiny random `CLIPVisionModelWithProjection` (image 32, patch 8, hidden 32,
  2 layers, 4 heads, projection 16, quick_gelu), weights re-drawn at O(1) scale, saved with
  safetensors (config.json + model.safetensors). `load_ip_adapter` finds it by its default
  `image_encoder_folder="image_encoder"` beside the adapter files;
- `ip-adapter.safetensors`: the h94/IP-Adapter single-file layout (`image_proj.proj.*`,
  `image_proj.norm.*`, `ip_adapter.{1,3,…,13}.to_{k,v}_ip.weight`), 4 image tokens;
- `ip-adapter-plus.safetensors`: the h94 "plus" layout (a Resampler over the encoder's penultimate
  hidden states: `image_proj.latents`, `proj_in`, `proj_out`, `norm_out`,
  `layers.{0..3}.0.{norm1,norm2,to_q,to_kv,to_out}`, `layers.{0..3}.1.{0,1,3}`), 4 queries,
  Resampler width 32, 2 heads of 64 (diffusers infers heads = to_q rows / 64 and always builds
  depth 4, so the file has 4 layers);
- `image.png`, `image2.png` (32×32 RGB: the feature extractor diffusers makes,
  `CLIPImageProcessor(size=32, crop_size=32)`, then resizes/crops nothing) and `bad.png` (a
  truncated PNG);
- `case_*.safetensors` (`latents` = unit noise [1,4,8,8], `expected` = final latents with the
  adapter, `plain` = the same run on the pipeline without any adapter, `pixel_values` = the
  feature extractor's output, `image_embeds` / `negative_image_embeds` = what the image
  projection receives for the conditional / unconditional half, and for the embeds case
  `ip_adapter_image_embeds` exactly as passed to the pipeline) + `manifest.json`: prompt,
  negative prompt, scheduler (DDIM / Euler from the model's scheduler config), steps, guidance,
  adapter file, scale (a number or the InstantStyle dict, plus the per-processor scales diffusers
  expanded it to), images, and the attn-processor → ip-key table.

Usage: python tools/reference/ip_adapter.py   (pinned versions: tools/reference/requirements.txt)
"""

import io
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.utils import logging as transformers_logging

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tests/fixtures/diffusers-made/model")
OUT = os.path.join(ROOT, "tests/fixtures/ip_adapter")

PROJ_DIM = 16        # image encoder projection_dim = base adapter's image embedding width
ENC_HIDDEN = 32      # image encoder hidden_size = Resampler embed_dims (proj_in input)
CROSS_DIM = 24       # UNet cross_attention_dim
NUM_TOKENS = 4       # base adapter image tokens (diffusers hard-codes 4 for this layout)
PLUS_QUERIES = 4     # Resampler queries = plus adapter image tokens
PLUS_HIDDEN = 32     # Resampler width (latents' last dim)
PLUS_HEADS = 2       # diffusers: heads = to_q.weight.shape[0] // 64, dim_head fixed at 64
PLUS_DEPTH = 4       # diffusers builds IPAdapterPlusImageProjection with its default depth=4


def build_image_encoder(path):
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=ENC_HIDDEN, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=PROJ_DIM,
                              hidden_act="quick_gelu", num_channels=3)
    torch.manual_seed(31)
    model = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):       # layer norms: 1 ± 0.1
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() > 1 and "position_embedding" not in name:   # matrices / patch conv
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:                                                   # class / position embeddings
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


def cross_attention_layers(unet):
    """(processor name, inner dim, ip key index) for each cross-attention, in the order diffusers'
    `_convert_ip_adapter_attn_to_diffusers` walks `unet.attn_processors` (key_id 1, 3, 5, …)."""
    layers, key_id = [], 1
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):
            continue
        module = unet.get_submodule(name[: -len(".processor")])
        layers.append((name, module.to_k.weight.shape[0], key_id))
        key_id += 2
    return layers


def build_base_adapter(path, layers):
    torch.manual_seed(41)
    sd = {"image_proj.proj.weight": torch.randn(NUM_TOKENS * CROSS_DIM, PROJ_DIM) / PROJ_DIM ** 0.5,
          "image_proj.proj.bias": 0.1 * torch.randn(NUM_TOKENS * CROSS_DIM),
          "image_proj.norm.weight": 1 + 0.1 * torch.randn(CROSS_DIM),
          "image_proj.norm.bias": 0.1 * torch.randn(CROSS_DIM)}
    for _, inner, key_id in layers:
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(inner, CROSS_DIM) / CROSS_DIM ** 0.5
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(inner, CROSS_DIM) / CROSS_DIM ** 0.5
    save_file(sd, path)


def build_plus_adapter(path, layers):
    torch.manual_seed(43)
    inner = PLUS_HEADS * 64
    ff = 4 * PLUS_HIDDEN

    def lin(o, i):
        return torch.randn(o, i) / i ** 0.5

    def ln(prefix, n):
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(n), f"{prefix}.bias": 0.1 * torch.randn(n)}

    sd = {"image_proj.latents": torch.randn(1, PLUS_QUERIES, PLUS_HIDDEN) / PLUS_HIDDEN ** 0.5,
          "image_proj.proj_in.weight": lin(PLUS_HIDDEN, ENC_HIDDEN),
          "image_proj.proj_in.bias": 0.1 * torch.randn(PLUS_HIDDEN),
          "image_proj.proj_out.weight": lin(CROSS_DIM, PLUS_HIDDEN),
          "image_proj.proj_out.bias": 0.1 * torch.randn(CROSS_DIM)}
    sd.update(ln("image_proj.norm_out", CROSS_DIM))
    for j in range(PLUS_DEPTH):
        p = f"image_proj.layers.{j}"
        sd.update(ln(f"{p}.0.norm1", PLUS_HIDDEN))
        sd.update(ln(f"{p}.0.norm2", PLUS_HIDDEN))
        sd[f"{p}.0.to_q.weight"] = lin(inner, PLUS_HIDDEN)
        sd[f"{p}.0.to_kv.weight"] = lin(2 * inner, PLUS_HIDDEN)
        sd[f"{p}.0.to_out.weight"] = lin(PLUS_HIDDEN, inner)
        sd.update(ln(f"{p}.1.0", PLUS_HIDDEN))
        sd[f"{p}.1.1.weight"] = lin(ff, PLUS_HIDDEN)
        sd[f"{p}.1.3.weight"] = lin(PLUS_HIDDEN, ff)
    for _, inner_dim, key_id in layers:
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = lin(inner_dim, CROSS_DIM)
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = lin(inner_dim, CROSS_DIM)
    save_file(sd, path)


def write_images():
    yy, xx = np.mgrid[0:32, 0:32]
    a = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).clip(0, 255).astype(np.uint8)
    a[8:20, 10:26] = [230, 40, 60]
    Image.fromarray(a, mode="RGB").save(os.path.join(OUT, "image.png"))
    rng = np.random.default_rng(7)
    b = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    b[:, :16, 2] = 200
    Image.fromarray(b, mode="RGB").save(os.path.join(OUT, "image2.png"))
    buf = io.BytesIO()
    Image.fromarray(a, mode="RGB").save(buf, format="PNG")
    data = buf.getvalue()
    with open(os.path.join(OUT, "bad.png"), "wb") as f:
        f.write(data[: len(data) // 2])   # valid signature and IHDR, IDAT cut short, no IEND
    try:
        Image.open(os.path.join(OUT, "bad.png")).load()
        raise AssertionError("bad.png decoded")
    except (OSError, SyntaxError):
        pass


def load(scheduler):
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    pipe = StableDiffusionPipeline.from_pretrained(
        SOURCE, safety_checker=None, requires_safety_checker=False,
        tokenizer=CLIPTokenizer.from_pretrained(SOURCE, subfolder="tokenizer"),
        scheduler=cls.from_pretrained(SOURCE, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_adapter(pipe, weight_name):
    # image_encoder_folder defaults to "image_encoder" (found beside the weight file);
    # low_cpu_mem_usage=False makes diffusers load the converted state dicts strictly.
    pipe.load_ip_adapter(OUT, subfolder="", weight_name=weight_name, low_cpu_mem_usage=False)
    fe = pipe.feature_extractor
    assert fe is not None and fe.crop_size == {"height": 32, "width": 32}, fe
    return pipe


def processor_scales(pipe):
    return {name[: -len(".processor")]: p.scale[0] for name, p in pipe.unet.attn_processors.items()
            if hasattr(p, "to_k_ip")}


def main():
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    build_image_encoder(os.path.join(OUT, "image_encoder"))
    probe = load("ddim")
    print("attn_processors order:")
    for name in probe.unet.attn_processors.keys():
        print("  ", name)
    layers = cross_attention_layers(probe.unet)
    del probe
    build_base_adapter(os.path.join(OUT, "ip-adapter.safetensors"), layers)
    build_plus_adapter(os.path.join(OUT, "ip-adapter-plus.safetensors"), layers)
    write_images()
    images = {n: Image.open(os.path.join(OUT, n)).convert("RGB") for n in ("image.png", "image2.png")}

    # (name, scheduler, adapter file, scale, ip images, prompt, negative prompt, mode)
    cases = [
        ("base_0.7_ddim", "ddim", "ip-adapter.safetensors", 0.7, ["image.png"],
         "a photo of a cat on a table", "blurry", "image"),
        ("base_1.0_euler", "euler", "ip-adapter.safetensors", 1.0, ["image.png"],
         "a watercolor painting of a house", None, "image"),
        ("base_0.0_ddim", "ddim", "ip-adapter.safetensors", 0.0, ["image.png"],
         "a photo of a cat on a table", "blurry", "image"),
        ("base_instantstyle_ddim", "ddim", "ip-adapter.safetensors", {"up": {"block_1": [0.0, 1.0]}},
         ["image.png"], "a photo of a cat on a table", "blurry", "image"),
        ("plus_0.6_euler", "euler", "ip-adapter-plus.safetensors", 0.6, ["image.png"],
         "a watercolor painting of a house", "blurry", "image"),
        ("base_two_images_ddim", "ddim", "ip-adapter.safetensors", 0.7, ["image.png", "image2.png"],
         "a photo of a cat on a table", "blurry", "image"),
        ("base_mean_embeds_ddim", "ddim", "ip-adapter.safetensors", 0.7, ["image.png", "image2.png"],
         "a photo of a cat on a table", "blurry", "mean_embeds"),
    ]
    runs, outputs = [], {}
    for n, (name, scheduler, adapter, scale, used, prompt, negative, mode) in enumerate(cases):
        # The mean-embeds case shares the two-images case's noise, so the two can be compared.
        seed = 200 + (n - 1 if mode == "mean_embeds" else n)
        torch.manual_seed(seed)
        noise = torch.randn(1, 4, 8, 8)
        kw = dict(prompt=prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.5,
                  height=16, width=16, output_type="latent")
        with torch.no_grad():
            plain = load(scheduler)(latents=noise.clone(), **kw).images
            pipe = load_adapter(load(scheduler), adapter)
            pipe.set_ip_adapter_scale(scale)
            plus = adapter == "ip-adapter-plus.safetensors"
            pixels = pipe.feature_extractor([images[u] for u in used], return_tensors="pt").pixel_values
            # Feature extraction at the encoder's size is exactly (x/255 - mean)/std, no resampling.
            manual = torch.stack([torch.from_numpy(np.asarray(images[u], dtype=np.float32) / 255).permute(2, 0, 1)
                                  for u in used])
            mean = torch.tensor(pipe.feature_extractor.image_mean).view(1, 3, 1, 1)
            std = torch.tensor(pipe.feature_extractor.image_std).view(1, 3, 1, 1)
            assert (pixels - (manual - mean) / std).abs().max() < 1e-5
            enc = pipe.image_encoder
            if plus:
                out = enc(pixels, output_hidden_states=True)
                assert len(out.hidden_states) == 3   # pre_layrnorm(embeddings), layer 0, layer 1
                embeds = out.hidden_states[-2]
                negative_embeds = enc(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
            else:
                embeds = enc(pixels).image_embeds
                negative_embeds = torch.zeros_like(embeds)
            extra = {}
            if mode == "image":
                ip = [images[u] for u in used]
                arg = dict(ip_adapter_image=ip[0] if len(ip) == 1 else [ip])
            else:
                mean_embeds = embeds.mean(0, keepdim=True)                    # [1, 16]
                # Under CFG: [negative; positive] along dim 0, each [batch, num_images, dim].
                passed = torch.cat([torch.zeros_like(mean_embeds), mean_embeds])[:, None, :]  # [2, 1, 16]
                arg = dict(ip_adapter_image_embeds=[passed])
                extra = {"ip_adapter_image_embeds": passed.contiguous(), "mean_image_embeds": mean_embeds}
            # Cross-check what the pipeline builds for the image projection.
            if mode == "image":
                built = pipe.prepare_ip_adapter_image_embeds(arg["ip_adapter_image"], None, "cpu", 1, True)
                assert len(built) == 1 and built[0].shape[:2] == (2, len(used))
                assert torch.equal(built[0][0], negative_embeds) and torch.equal(built[0][1], embeds)
            result = pipe(latents=noise.clone(), **arg, **kw).images
            scales = processor_scales(pipe)
        diff = (result - plain).abs().max().item()
        if scale == 0.0:
            assert diff == 0.0, f"{name}: scale 0 changed the result by {diff}"
        else:
            assert diff > 1e-2, f"{name}: the adapter changed little ({diff})"
        file = f"case_{n}.safetensors"
        tensors = {"latents": noise, "expected": result.contiguous(), "plain": plain.contiguous(),
                   "pixel_values": pixels.contiguous(), "image_embeds": embeds.contiguous(),
                   "negative_image_embeds": negative_embeds.contiguous(), **extra}
        save_file(tensors, os.path.join(OUT, file))
        outputs[name] = result
        runs.append({"file": file, "name": name, "seed": seed, "scheduler": scheduler, "prompt": prompt,
                     "negative_prompt": negative, "steps": 8, "guidance": 7.5, "height": 16, "width": 16,
                     "adapter": adapter, "scale": scale, "processor_scales": scales, "images": used,
                     "input": "ip_adapter_image" if mode == "image" else "ip_adapter_image_embeds (mean)"})
        print(f"{name:26s} max|expected-plain| = {diff:.6f}   max|expected| = {result.abs().max().item():.4f}")
    gap = (outputs["base_two_images_ddim"] - outputs["base_mean_embeds_ddim"]).abs().max().item()
    print(f"two images (tokens concatenated) vs their mean embedding: max diff {gap:.6f}")
    table = [{"processor": name[: -len(".processor")], "ip_key": key_id, "inner_dim": inner}
             for name, inner, key_id in layers]
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"cross_attention": table, "runs": runs}, f, indent=1)
    print(f"wrote {len(runs)} runs to {OUT}")


def write_pickled_copy():
    """`ip-adapter.bin`: the base adapter as h94's original pickled layout, two nested dicts
    `{"image_proj": {...}, "ip_adapter": {...}}` (read without unpickling on the Rust side)."""
    from safetensors.torch import load_file
    flat = load_file(os.path.join(OUT, "ip-adapter.safetensors"))
    nested = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        group, rest = k.split(".", 1)
        nested[group][rest] = v
    torch.save(nested, os.path.join(OUT, "ip-adapter.bin"))


if __name__ == "__main__":
    main()
    write_pickled_copy()
