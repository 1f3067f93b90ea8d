"""Reference fixtures for `imprint eval` (DreamBench metrics CLIP-I, CLIP-T and DINO), computed with
transformers on CPU in float32 from tiny random models and synthetic images, all from fixed seeds.

Writes under tests/fixtures/eval/:

- `clip/`: a tiny random `CLIPModel` (`config.json` + `model.safetensors`, quick_gelu, projection
  dim 16, eos = pad = 999 / bos = 998 like the 1000-token tokenizer), that tokenizer
  (`tokenizer.json` + `tokenizer_config.json`, copied through `CLIPTokenizer` from
  tests/fixtures/diffusers-made/model/tokenizer; the load-time flags `is_local` /
  `local_files_only` that transformers 5.24 writes into the config are dropped) and the
  `preprocessor_config.json` of a CLIP image processor (shortest edge 32, bicubic, center crop
  32×32, OpenAI CLIP mean/std, convert to RGB);
- `dino/`: a tiny random `ViTModel` (patch 8, layer_norm_eps 1e-6) saved WITHOUT the pooler, as
  the facebook/dino-vit* checkpoints are (their conversion script builds
  `ViTModel(config, add_pooling_layer=False)`), and the `preprocessor_config.json` of a ViT image
  processor (32×32, bilinear, ImageNet mean/std, convert to RGB);
- `images/generated/` (4), `images/references/` (3): 32×32 RGB PNGs; `images/odd/`: a 48×40
  (width × height) RGB PNG and a 40×56 RGBA PNG with partial transparency (resize, crop and
  alpha-compositing paths);
- `expected.safetensors`: the processors' `pixel_values`, `CLIPModel.get_image_features` /
  `get_text_features` (projected, not normalized), the DINO CLS features
  (`ViTModel(...).last_hidden_state[:, 0]`, after the final layernorm), the prompts' `input_ids`
  (padding="max_length", max_length=77, truncation=True), the cosine matrices and the metrics
  (`clip_i`, `clip_t_prompt0`, `dino`: means of cosines over (generated, reference) pairs, over
  generated images against prompt 0); metadata `prompts` (a JSON list);
- `expected.json`: the prompts, the metric values and what the script checked.

The image processors are the PIL-backend classes (`CLIPImageProcessorPil`, `ViTImageProcessorPil`,
i.e. PIL `Image.resize` on uint8 images), used explicitly. In transformers 5 the plain names
(`CLIPImageProcessor`, `ViTImageProcessor`, and what `AutoImageProcessor` picks by default) are
the torchvision backend when torchvision is installed and fall back to the PIL classes otherwise;
the reference venv has no torchvision. The saved `preprocessor_config.json` names the base class
(`CLIPImageProcessor` / `ViTImageProcessor`), as the PIL classes' `to_dict` writes.

Model weights are re-drawn O(1) (`randomize`): the default init (std 0.02, layernorms 1/0, zero
biases) makes such tiny models nearly input-independent (all cosines ≈ 1).

Usage: python tools/reference/eval_models.py   (pinned versions: tools/reference/requirements.txt,
plus Pillow 13.0.0, which decodes/resizes the images; no torchvision installed)
"""

import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "tests/fixtures/diffusers-made/model/tokenizer")
OUT = os.path.join(ROOT, "tests/fixtures/eval")

PROMPTS = [
    "a photo of sks dog",
    "a sks dog wearing a red hat, in the snow",
    "An OIL painting of a cat!!",
]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_DEFAULT_MEAN = [0.485, 0.456, 0.406]
IMAGENET_DEFAULT_STD = [0.229, 0.224, 0.225]
DINO_POOLER = False  # facebook/dino-vit* ship no pooler.dense.* weights


def synthetic_image(rng, w, h, channels=3):
    """Gradients, a few filled rectangles and ellipses, and some noise, as uint8 [h, w, channels]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, p = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0, 2 * np.pi)
        f = rng.uniform(0.05, 0.4)
        img[..., c] = 127 + 60 * np.sin(f * (a * xx + b * yy) + p) + rng.uniform(-50, 50)
    for _ in range(rng.integers(2, 5)):
        color = rng.uniform(0, 255, 3)
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        x1, y1 = rng.integers(x0 + 3, w + 1), rng.integers(y0 + 3, h + 1)
        if rng.random() < 0.5:
            img[y0:y1, x0:x1] = color
        else:
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = color
    img += rng.normal(0, rng.uniform(2, 25), img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if channels == 4:
        # alpha: opaque, fully transparent and partial regions (a radial ramp)
        r = np.sqrt(((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
        alpha = np.clip(np.rint(255 * (1.2 - 2.2 * r)), 0, 255).astype(np.uint8)
        alpha[: h // 6] = 0
        img = np.concatenate([img, alpha[..., None]], axis=-1)
    return img


def write_images(folder):
    rng = np.random.default_rng(2024)
    files = {"generated": [], "references": [], "odd": []}
    for group, n in (("generated", 4), ("references", 3)):
        os.makedirs(os.path.join(folder, group), exist_ok=True)
        for i in range(n):
            path = os.path.join(folder, group, f"{i}.png")
            Image.fromarray(synthetic_image(rng, 32, 32), "RGB").save(path)
            files[group].append(path)
    os.makedirs(os.path.join(folder, "odd"), exist_ok=True)
    path = os.path.join(folder, "odd", "0_48x40_rgb.png")
    Image.fromarray(synthetic_image(rng, 48, 40), "RGB").save(path)
    files["odd"].append(path)
    path = os.path.join(folder, "odd", "1_40x56_rgba.png")
    Image.fromarray(synthetic_image(rng, 40, 56, channels=4), "RGBA").save(path)
    files["odd"].append(path)
    return files


def load_images(paths):
    # what a metric does with files: PIL.Image.open, handed to the processor as is (mode kept)
    out = []
    for p in paths:
        with Image.open(p) as im:
            im.load()
            out.append(im.copy())
    return out


def build_clip(folder, tokenizer):
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=16),
        vision_config=dict(
            image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    randomize(model, 12)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    # transformers 5.24 writes the load-time flags `is_local` / `local_files_only` into the saved
    # tokenizer_config.json; they are not tokenizer settings (the source file has none), drop them
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_resize=True, do_center_crop=True,
        resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD, do_convert_rgb=True)
    processor.save_pretrained(folder)
    # reload from the folder, strictly, as a user of the files would
    model2 = CLIPModel.from_pretrained(folder).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    return model2, CLIPImageProcessorPil.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder)


def build_dino(folder):
    torch.manual_seed(1)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTModel(config, add_pooling_layer=DINO_POOLER).eval()
    randomize(model, 11)
    model.save_pretrained(folder, safe_serialization=True)
    processor = ViTImageProcessorPil(
        size={"height": 32, "width": 32}, do_resize=True, resample=2, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD, do_convert_rgb=True)
    processor.save_pretrained(folder)
    model2 = ViTModel.from_pretrained(folder, add_pooling_layer=DINO_POOLER).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    return model2, ViTImageProcessorPil.from_pretrained(folder)


def randomize(model, seed):
    """Every parameter O(1)-random (default init leaves layernorms at 1/0, biases at 0 and weights at
    std 0.02, which makes the tiny models' outputs nearly input-independent): weights N(0, 1/fan_in),
    biases N(0, 0.1²), layernorm weights 1 + N(0, 0.1²), embeddings / tokens N(0, 0.5²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embedding" in name or "cls_token" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name == "logit_scale":
                pass
            else:
                raise ValueError(f"unhandled parameter {name} {tuple(p.shape)}")


def by_hand(img, clip):
    """The processors' pipeline spelled out (checks the description in expected.json): alpha composited
    onto opaque white (PIL.Image.alpha_composite; = round((c·a + 255·(255 − a)) / 255)), else
    convert("RGB"); CLIP: PIL bicubic resize of the uint8 image so the short side is 32 and the long
    side int(32·long/short) (truncated), center crop at ((H − 32) // 2, (W − 32) // 2); DINO: PIL
    bilinear resize to 32×32; then x / 255 (float64 → float32), (x − mean) / std in float32."""
    if "A" in img.getbands():
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB")
    else:
        img = img.convert("RGB")
    w, h = img.size
    if clip:
        s = 32
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        x = np.array(img.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else img)
        top, left = (nh - 32) // 2, (nw - 32) // 2
        x = x[top:top + 32, left:left + 32]
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    else:
        x = np.array(img.resize((32, 32), Image.BILINEAR) if (w, h) != (32, 32) else img)
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    x = (x.astype(np.float64) / 255).astype(np.float32)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def cos_matrix(a, b):
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def main():
    torch.set_num_threads(1)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    notes = {}

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    clip, clip_proc, tokenizer = build_clip(os.path.join(OUT, "clip"), tokenizer)
    dino, dino_proc = build_dino(os.path.join(OUT, "dino"))
    files = write_images(os.path.join(OUT, "images"))
    images = {g: load_images(p) for g, p in files.items()}

    t = {}
    with torch.no_grad():
        for g in ("generated", "references", "odd"):
            pv = clip_proc(images=images[g], return_tensors="pt")["pixel_values"]
            assert pv.dtype == torch.float32 and pv.shape == (len(images[g]), 3, 32, 32)
            out = clip.get_image_features(pixel_values=pv)
            emb = out.pooler_output if not torch.is_tensor(out) else out
            ref = clip.visual_projection(clip.vision_model(pixel_values=pv).pooler_output)
            assert torch.equal(emb, ref), "get_image_features != visual_projection(vision_model.pooler_output)"
            t[f"clip_image_embeds_{g}"] = emb

            dv = dino_proc(images=images[g], return_tensors="pt")["pixel_values"]
            assert dv.dtype == torch.float32 and dv.shape == (len(images[g]), 3, 32, 32)
            o = dino(pixel_values=dv, output_hidden_states=True)
            cls = o.last_hidden_state[:, 0]
            # last_hidden_state is after the final layernorm: layernorm(last encoder hidden state)
            assert torch.equal(cls, dino.layernorm(o.hidden_states[-1])[:, 0])
            t[f"dino_cls_{g}"] = cls
            for i, im in enumerate(images[g]):
                for kind, v in (("clip", pv), ("dino", dv)):
                    d = (by_hand(im, kind == "clip") - v[i]).abs().max().item()
                    assert d < 1e-6, (g, i, kind, d)
            if g != "references":
                t[f"clip_pixel_values_{g}"] = pv
                t[f"dino_pixel_values_{g}"] = dv
        notes["get_image_features"] = (
            "returns BaseModelOutputWithPooling in transformers 5; pooler_output is the projected "
            "embedding, equal to visual_projection(vision_model(pv).pooler_output)")
        notes["dino_cls"] = "last_hidden_state[:, 0] equals layernorm(hidden_states[-1])[:, 0] (final layernorm applied)"

        # text: the way a metric calls the tokenizer / model
        enc = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        text = clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        no_mask = clip.get_text_features(input_ids=ids).pooler_output
        unpadded = torch.cat([clip.get_text_features(**tokenizer([p], return_tensors="pt")).pooler_output
                              for p in PROMPTS])
        d_mask = (text - no_mask).abs().max().item()
        d_pad = (text - unpadded).abs().max().item()
        assert d_mask < 1e-5 and d_pad < 1e-5, (d_mask, d_pad)
        notes["clip_text_padding"] = (
            f"max |Δ text_embeds|: with vs without attention_mask {d_mask:.3g}, padded to 77 vs unpadded "
            f"{d_pad:.3g} (causal mask; pooled at the first eos id {clip.config.text_config.eos_token_id}, "
            "which is also the pad id)")
        t["clip_input_ids"] = ids.to(torch.int64)
        t["clip_attention_mask"] = mask.to(torch.int64)
        t["clip_text_embeds"] = text

        gen_ref = cos_matrix(t["clip_image_embeds_generated"], t["clip_image_embeds_references"])
        gen_txt = cos_matrix(t["clip_image_embeds_generated"], text)
        dino_gr = cos_matrix(t["dino_cls_generated"], t["dino_cls_references"])
        t["clip_i_cosines"] = gen_ref  # [generated, reference]
        t["clip_t_cosines"] = gen_txt  # [generated, prompt]
        t["dino_cosines"] = dino_gr  # [generated, reference]
        t["clip_i"] = gen_ref.mean()
        t["clip_t_prompt0"] = gen_txt[:, 0].mean()
        t["dino"] = dino_gr.mean()

    t = {k: v.detach().contiguous() for k, v in t.items()}
    for k, v in t.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    # not degenerate: the cosines spread out
    for k in ("clip_i_cosines", "clip_t_cosines", "dino_cosines"):
        assert t[k].max() - t[k].min() > 0.2 and t[k].max() < 0.99, (k, t[k])
    save_file(t, os.path.join(OUT, "expected.safetensors"), metadata={"prompts": json.dumps(PROMPTS)})
    back = load_file(os.path.join(OUT, "expected.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in t.items())

    # diagnostic, not a fixture: torch's antialiased bicubic (what the torchvision backend runs) vs
    # PIL's bicubic on the odd RGB image (CLIP resize 48×40 -> 38×32)
    im = np.array(images["odd"][0])
    pil = np.array(images["odd"][0].resize((38, 32), Image.BICUBIC)).astype(np.int32)
    x = torch.from_numpy(im).permute(2, 0, 1)[None].float()
    tv = F.interpolate(x, size=(32, 38), mode="bicubic", antialias=True, align_corners=False)
    tv = tv.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.int32)
    notes["pil_vs_torch_bicubic_aa"] = (
        f"48x40->38x32: max |PIL - torch interpolate(bicubic, antialias)| = {np.abs(pil - tv).max()} uint8 levels, "
        f"{(pil != tv).mean() * 100:.1f}% of values differ")

    summary = {
        "prompts": PROMPTS,
        "metrics": {k: float(t[k]) for k in ("clip_i", "clip_t_prompt0", "dino")},
        "image_processor_classes": {"clip": type(clip_proc).__name__, "dino": type(dino_proc).__name__},
        "images": {g: [os.path.relpath(p, OUT) for p in ps] for g, ps in files.items()},
        "notes": notes,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")

    for k, v in t.items():
        print(f"{k:32s} {str(list(v.shape)):14s} {str(v.dtype):14s} max|v| {v.abs().max().item():.6g}")
    for k, v in summary["metrics"].items():
        print(f"{k} = {v:.7f}")
    for k, v in notes.items():
        print(f"{k}: {v}")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"fixture size: {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
