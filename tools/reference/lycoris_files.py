"""LyCORIS files (LoHa, LoKr, (IA)³, diag-OFT) in kohya's key layout and the samples they give,
from this script's own implementation of the LyCORIS modules' math (KohakuBlueleaf/LyCORIS
`lycoris/modules/{loha,lokr,ia3,diag_oft}.py`: the merged weights those modules produce), written
independently of imprint's code.

Writes under tests/fixtures/lycoris/, for the diffusers-made tiny model
(tests/fixtures/diffusers-made/model):

- `loha.safetensors`: LoHa on attention projections (linear), on 3×3 convolutions without and
  with Tucker cores (`hada_t1/t2`), and on text-encoder projections; alphas set and missing;
- `lokr.safetensors`: LoKr with a full `w1` and a low-rank `w2`, both factors full (alpha
  ignored), and a convolution with a Tucker `lokr_t2`;
- `ia3.safetensors`: (IA)³ on outputs and (`on_input`) on inputs;
- `oft.safetensors`: diag-OFT with and without an active norm constraint, one with `rescale`;
- `sample_*.safetensors` + `manifest.json`: DDIM 8-step guided sampling with the weights merged
  as LyCORIS merges them (W + m·ΔW; OFT: rescale ⊙ R_mᵀ W), at the scales in the manifest.

Usage: python tools/reference/lycoris_files.py   (pinned versions: tools/reference/requirements.txt)
"""

import json
import os

import torch
from safetensors.torch import save_file
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests/fixtures/diffusers-made/model")
OUT = os.path.join(ROOT, "tests/fixtures/lycoris")


def key(network, module):
    prefix = "lora_unet_" if network == "unet" else "lora_te_"
    return prefix + module.replace(".", "_")


def rnd(*shape, s=0.2):
    return torch.randn(*shape) * s


def tucker(t, a, b):
    # Σ_{i,j} t[i,j,h,w] b[j,q] a[i,p] -> [p, q, h, w]
    return torch.einsum("ijhw,jq,ip->pqhw", t, b, a)


def loha_delta(p, w):
    r = p["hada_w1_b"].shape[0]
    alpha = float(p["alpha"]) if "alpha" in p and float(p["alpha"]) != 0 else r
    if "hada_t1" in p:
        d = tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    else:
        d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    return d.reshape(w.shape) * (alpha / r)


def lokr_delta(p, w):
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    r = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else (p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None)
    if r is None:
        scale = 1.0
    else:
        alpha = float(p["alpha"]) if "alpha" in p and float(p["alpha"]) != 0 else r
        scale = alpha / r
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1.contiguous(), w2.contiguous()).contiguous().reshape(w.shape) * scale


def merged(kind, p, w, m):
    w = w.double()
    p = {k: v.double() for k, v in p.items()}
    if kind == "loha":
        return w + m * loha_delta(p, w)
    if kind == "lokr":
        return w + m * lokr_delta(p, w)
    if kind == "ia3":
        g = 1 + m * p["weight"].flatten()
        if int(p["on_input"]):
            return w * g.reshape([1, -1] + [1] * (w.dim() - 2))
        return w * g.reshape([-1] + [1] * (w.dim() - 1))
    if kind == "oft":
        blocks = p["oft_blocks"]
        n, b, _ = blocks.shape
        q = blocks - blocks.transpose(1, 2)
        c = float(p.get("alpha", torch.tensor(0.0))) * w.shape[0]
        norm = torch.norm(q)
        if c > 0 and norm > c:
            q = q * c / (norm + 1e-8)
        eye = torch.eye(b, dtype=q.dtype).expand(n, b, b)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        r = eye + m * (r - eye)
        wk = w.reshape(n, b, -1)
        new = torch.einsum("knm,knr->kmr", r, wk).reshape(w.shape)
        if "rescale" in p:
            new = p["rescale"].reshape([-1] + [1] * (w.dim() - 1)) * new
        return new
    raise ValueError(kind)


def build_files(unet, te):
    torch.manual_seed(3)
    um = dict(unet.named_modules())
    tm = dict(te.named_modules())
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    attn2 = "down_blocks.0.attentions.0.transformer_blocks.1.attn2"
    conv = "down_blocks.0.resnets.0.conv1"       # 16 -> 16, 3x3
    conv2 = "up_blocks.1.resnets.0.conv2"        # 16 -> 16, 3x3
    # kohya names text-encoder modules from `text_model` (transformers 4's layout).
    q_proj = "text_model.encoder.layers.0.self_attn.q_proj"  # 24 -> 24
    k_proj = "text_model.encoder.layers.1.self_attn.k_proj"
    v_proj = "text_model.encoder.layers.1.self_attn.v_proj"

    def shape(net, name):
        if net == "unet":
            return tuple(um[name].weight.shape)
        return tuple(tm[name.removeprefix("text_model.")].weight.shape)

    files = {}
    # LoHa
    f = {}
    for net, name, alpha, r in [("unet", f"{attn}.to_q", 2.0, 4), ("unet", f"{attn2}.to_v", None, 3),
                                ("te", q_proj, 1.0, 2)]:
        o, i = shape(net, name)
        k = key(net, name)
        f[f"{k}.hada_w1_a"], f[f"{k}.hada_w1_b"] = rnd(o, r), rnd(r, i)
        f[f"{k}.hada_w2_a"], f[f"{k}.hada_w2_b"] = rnd(o, r), rnd(r, i)
        if alpha is not None:
            f[f"{k}.alpha"] = torch.tensor(alpha)
    o, i, kh, kw = shape("unet", conv)
    k = key("unet", conv)
    f[f"{k}.hada_w1_a"], f[f"{k}.hada_w1_b"] = rnd(o, 4), rnd(4, i * kh * kw)
    f[f"{k}.hada_w2_a"], f[f"{k}.hada_w2_b"] = rnd(o, 4), rnd(4, i * kh * kw)
    f[f"{k}.alpha"] = torch.tensor(3.0)
    k = key("unet", conv2)
    f[f"{k}.hada_t1"], f[f"{k}.hada_t2"] = rnd(3, 3, kh, kw), rnd(3, 3, kh, kw)
    f[f"{k}.hada_w1_a"], f[f"{k}.hada_w1_b"] = rnd(3, o), rnd(3, i)
    f[f"{k}.hada_w2_a"], f[f"{k}.hada_w2_b"] = rnd(3, o), rnd(3, i)
    f[f"{k}.alpha"] = torch.tensor(2.0)
    files["loha"] = f
    # LoKr: out = a·b, in = c·d
    f = {}
    o, i = shape("unet", f"{attn}.to_k")  # 16 x 16
    k = key("unet", f"{attn}.to_k")
    f[f"{k}.lokr_w1"] = rnd(4, 4, s=0.5)
    f[f"{k}.lokr_w2_a"], f[f"{k}.lokr_w2_b"] = rnd(4, 2), rnd(2, 4)
    f[f"{k}.alpha"] = torch.tensor(1.0)
    o, i = shape("unet", f"{attn2}.to_k")  # 16 x 24
    k = key("unet", f"{attn2}.to_k")
    f[f"{k}.lokr_w1"], f[f"{k}.lokr_w2"] = rnd(2, 4, s=0.5), rnd(8, 6)
    f[f"{k}.alpha"] = torch.tensor(7.0)  # ignored: both factors full
    o, i, kh, kw = shape("unet", conv)
    k = key("unet", conv)
    f[f"{k}.lokr_w1_a"], f[f"{k}.lokr_w1_b"] = rnd(4, 2, s=0.5), rnd(2, 2, s=0.5)
    f[f"{k}.lokr_t2"] = rnd(2, 2, kh, kw)
    f[f"{k}.lokr_w2_a"], f[f"{k}.lokr_w2_b"] = rnd(2, 4), rnd(2, 8)
    f[f"{k}.alpha"] = torch.tensor(1.5)
    o, i = shape("te", k_proj)
    k = key("te", k_proj)
    f[f"{k}.lokr_w1_a"], f[f"{k}.lokr_w1_b"] = rnd(4, 2, s=0.5), rnd(2, 4, s=0.5)
    f[f"{k}.lokr_w2"] = rnd(o // 4, i // 4)
    files["lokr"] = f
    # (IA)³
    f = {}
    for net, name, on_input in [("unet", f"{attn2}.to_k", 0), ("unet", f"{attn2}.to_out.0", 1),
                                ("te", q_proj, 0)]:
        o, i = shape(net, name)[:2]
        k = key(net, name)
        f[f"{k}.weight"] = rnd(i if on_input else o, s=0.5)
        f[f"{k}.on_input"] = torch.tensor(on_input)
    files["ia3"] = f
    # diag-OFT
    f = {}
    for net, name, blocks, alpha, rescale in [("unet", f"{attn}.to_v", 4, 0.0, False),
                                              ("unet", conv, 2, 0.01, True),
                                              ("te", v_proj, 4, 0.0, False)]:
        shp = shape(net, name)
        o = shp[0]
        k = key(net, name)
        f[f"{k}.oft_blocks"] = rnd(blocks, o // blocks, o // blocks, s=0.3)
        f[f"{k}.alpha"] = torch.tensor(alpha)
        if rescale:
            f[f"{k}.rescale"] = 1 + rnd(*([o] + [1] * (len(shp) - 1)), s=0.1)
    files["oft"] = f
    return files


def apply_file(unet, te, kind, tensors, m):
    groups = {}
    for k, v in tensors.items():
        prefix, part = k.split(".", 1)
        groups.setdefault(prefix, {})[part] = v
    names = {}
    for model, pre in [(unet, "lora_unet_"), (te, "lora_te_text_model_")]:
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                names[pre + name.replace(".", "_")] = mod
    with torch.no_grad():
        for prefix, parts in groups.items():
            mod = names[prefix]
            mod.weight.copy_(merged(kind, parts, mod.weight, m).float())


def main():
    os.makedirs(OUT, exist_ok=True)
    scheduler = DDIMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    tok = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    load = lambda: StableDiffusionPipeline.from_pretrained(
        MODEL, safety_checker=None, requires_safety_checker=False, scheduler=scheduler, tokenizer=tok)
    pipe = load()
    files = build_files(pipe.unet, pipe.text_encoder)
    for kind, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{kind}.safetensors"))
    torch.manual_seed(0)
    init = torch.randn(1, 4, 8, 8)
    prompt, negative = "a photo of a cat on a table", "blurry"
    with torch.no_grad():
        plain = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.5,
                     latents=init.clone(), output_type="latent").images
    runs = []
    cases = [(["loha"], [1.0]), (["lokr"], [0.7]), (["ia3"], [1.0]), (["oft"], [1.0]), (["oft"], [0.5]),
             (["loha", "lokr", "ia3", "oft"], [0.8, 1.0, 0.6, 1.2])]
    for n, (kinds, scales) in enumerate(cases):
        pipe = load()
        pipe.set_progress_bar_config(disable=True)
        for kind, m in zip(kinds, scales):
            apply_file(pipe.unet, pipe.text_encoder, kind, files[kind], m)
        with torch.no_grad():
            result = pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.5,
                          latents=init.clone(), output_type="latent").images
        assert (result - plain).abs().max() > 1e-3, f"{kinds}: no effect"
        file = f"sample_{n}.safetensors"
        save_file({"latents": init, "expected": result.contiguous(), "plain": plain.contiguous()},
                  os.path.join(OUT, file))
        runs.append({"file": file, "concepts": [f"{k}.safetensors:{m}" for k, m in zip(kinds, scales)],
                     "prompt": prompt, "negative_prompt": negative, "scheduler": "ddim", "steps": 8,
                     "guidance": 7.5})
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"model": "diffusers-made", "runs": runs}, f, indent=1)
    print(f"wrote {len(runs)} runs to {OUT}")


if __name__ == "__main__":
    main()
