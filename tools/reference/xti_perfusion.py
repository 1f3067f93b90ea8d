"""Reference samples for Extended Textual Inversion (P+) and Perfusion concepts, computed with
diffusers/transformers and this script's own implementation of each method's math (neither
diffusers nor transformers implements them), independent of imprint's code.

Writes under tests/fixtures/xti_perfusion/:

- `model/`: a tiny pipeline built entirely with diffusers/transformers whose UNet has SD 1.x's
  block layout (3 cross-attention down blocks, 2 layers each; mid; 3 cross-attention up blocks, 3
  layers each): the 16 cross-attention layers a kohya XTI file addresses. Text encoder, tokenizer
  (1000 tokens) and VAE come from tests/fixtures/diffusers-made/model.
- `xti-cat.safetensors`: a kohya XTI file (keys IN01 … OUT11, [2, 24] each; trigger = stem), and
  `xti_*.safetensors` reference runs. Per-layer conditioning is applied by replacing each attn2's
  `encoder_hidden_states` with that layer's states: the text encoder run with the layer's vectors
  in the rows of the trigger's tokens (kohya's `XTI_hijack` does the same per block).
- `perfusion-*.safetensors`: imprint-native Perfusion files (DESIGN.md's layout) and
  `perfusion_*.safetensors` reference runs, with an attn2 processor that computes the paper's
  `h(e) = W (e − s(e) i*) + σ((s(e) − β)/τ) o*` directly (and Appendix B's `s = G⁻¹ I'ᵀe` for two
  concepts), on every token of the conditional and unconditional states.
- `manifest.json`: each run's prompt, concepts, scheduler settings.

Every run is checked to differ from the plain model's sample, so a reference that silently drops
the concept cannot pass. Sampling: DDIM, 8 steps, guidance 7.5, `output_type="latent"`.

Usage: python tools/reference/xti_perfusion.py   (pinned versions: tools/reference/requirements.txt)
"""

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tests/fixtures/diffusers-made/model")
OUT = os.path.join(ROOT, "tests/fixtures/xti_perfusion")

KOHYA = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05",
         "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]


def build_model(path):
    if os.path.exists(path):
        shutil.rmtree(path)
    shutil.copytree(SOURCE, path)
    torch.manual_seed(11)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    # Random weights of a realistic scale (the default init leaves some projections at zero).
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    shutil.rmtree(os.path.join(path, "unet"))
    unet.save_pretrained(os.path.join(path, "unet"))
    return unet


def attn2_layers(unet):
    """attn2 module names in forward order (down, mid, up) with their transformer's path."""
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    names.sort(key=lambda n: (order[n.split(".")[0]], n))
    return names


class FixedStates:
    """attn2 attends to given states instead of the pipeline's (per-layer conditioning)."""

    def __init__(self, states):
        self.states = states
        self.inner = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return self.inner(attn, hidden_states, encoder_hidden_states=self.states,
                          attention_mask=attention_mask, temb=temb)


class Perfusion:
    """attn2 with every K and V projection edited by Perfusion's gated rank-1 formula, for one or
    several concepts: s = G⁻¹ [(C⁻¹i*_k)ᵀ e]_k, h(e) = W(e − Σ s_k i*_k) + Σ σ((s_k − β_k)/τ_k) o*_k."""

    def __init__(self, concepts, module, states=None):
        self.concepts = concepts  # dicts with i, cinv, beta, tau, outputs{module: (ok, ov)}, scale
        self.module = module
        self.states = states  # this layer's own text states (P+), else the pipeline's

    def edit(self, proj, e, which):
        inputs = torch.stack([c["i"] for c in self.concepts]).double()   # [k, d]
        cinvs = torch.stack([c["cinv"] for c in self.concepts]).double()  # [k, d]
        gram = inputs @ cinvs.T                                           # G_jk = i_j · C⁻¹ i_k
        s = torch.linalg.solve(gram, (e.double() @ cinvs.T).unsqueeze(-1)).squeeze(-1)  # [B, S, k]
        s = s.float()
        base = e
        out = 0
        for k, c in enumerate(self.concepts):
            sk = s[..., k:k + 1]
            base = base - sk * c["i"]
            ok, ov = c["outputs"][self.module]
            o = ok if which == "k" else ov
            gate = torch.sigmoid((sk - c["beta"]) / c["tau"])
            out = out + c["scale"] * gate * o
            # scale < 1 blends toward the plain projection (imprint scales the edit's terms)
            base = base + (1 - c["scale"]) * sk * c["i"]
        return proj(base) + out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        e = encoder_hidden_states if self.states is None else self.states
        q = attn.to_q(hidden_states)
        k = self.edit(attn.to_k, e, "k")
        v = self.edit(attn.to_v, e, "v")
        q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        probs = attn.get_attention_scores(q, k, None)
        h = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](h))


def load_pipe(path):
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False,
        scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, prompt):
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def add_tokens(pipe, names):
    assert pipe.tokenizer.add_tokens(names) == len(names)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    return pipe.tokenizer.convert_tokens_to_ids(names)


def sample(pipe, prompt, negative, init):
    with torch.no_grad():
        return pipe(prompt=prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.5,
                    latents=init.clone(), output_type="latent").images


def sample_with_states(pipe, cond, uncond, init):
    with torch.no_grad():
        return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=8,
                    guidance_scale=7.5, latents=init.clone(), output_type="latent").images


def xti_runs(path, unet_layers, runs, init):
    torch.manual_seed(5)
    dim = 24
    vectors = {k: torch.randn(2, dim) * 0.3 for k in KOHYA}
    save_file({k: v.contiguous() for k, v in vectors.items()}, os.path.join(OUT, "xti-cat.safetensors"))
    for r, (prompt, negative) in enumerate([("a photo of xti-cat on a table", None),
                                            ("xti-cat, oil painting of a xti-cat", "blurry")]):
        pipe = load_pipe(path)
        plain = sample(pipe, prompt, negative, init)
        ids = add_tokens(pipe, ["xti-cat", "xti-cat_1"])
        expanded = prompt.replace("xti-cat", "xti-cat xti-cat_1")
        table = pipe.text_encoder.get_input_embeddings().weight
        uncond = encode(pipe, negative or "")
        procs = {}
        for name, proc in pipe.unet.attn_processors.items():
            procs[name] = AttnProcessor()
        states = []
        for layer, key in zip(unet_layers, KOHYA):
            with torch.no_grad():
                table[ids[0]] = vectors[key][0]
                table[ids[1]] = vectors[key][1]
            cond = encode(pipe, expanded)
            procs[layer + ".processor"] = FixedStates(torch.cat([uncond, cond]))
            states.append(cond)
        assert not torch.equal(states[0], states[5]), "layers must differ"
        pipe.unet.set_attn_processor(procs)
        result = sample_with_states(pipe, states[0], uncond, init)
        assert (result - plain).abs().max() > 1e-3, "XTI reference equals the plain sample"
        file = f"xti_{r}.safetensors"
        save_file({"latents": init, "expected": result.contiguous(), "plain": plain.contiguous()},
                  os.path.join(OUT, file))
        runs.append({"file": file, "concepts": ["xti-cat.safetensors"], "prompt": prompt,
                     "negative_prompt": negative, "scheduler": "ddim", "steps": 8, "guidance": 7.5})


def perfusion_file(pipe, unet_layers, trigger, superclass, seed, beta=None, tau=None):
    """A Perfusion concept: its word's vector, i* = the word's encoding in a prompt, a random SPD C,
    and per-layer target outputs near the projections of i*."""
    torch.manual_seed(seed)
    dim = 24
    vec = torch.randn(1, dim) * 0.3
    [tid] = add_tokens(pipe, [trigger])
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[tid] = vec[0]
    states = encode(pipe, f"a photo of {trigger}")
    pos = pipe.tokenizer(f"a photo of {trigger}").input_ids.index(tid)
    i = states[0, pos].clone()
    a = torch.randn(dim, dim, dtype=torch.float64)
    c = a @ a.T / dim + torch.eye(dim, dtype=torch.float64)
    cinv = torch.linalg.solve(c, i.double()).float()
    tensors = {"text_encoder.token_embeddings": vec, "perfusion.target_input": i,
               "perfusion.target_input_cinv": cinv}
    outputs = {}
    modules = dict(pipe.unet.named_modules())
    for layer in unet_layers:
        m = modules[layer]
        with torch.no_grad():
            ok = m.to_k(i) + 0.5 * torch.randn(m.to_k.out_features)
            ov = m.to_v(i) + 0.5 * torch.randn(m.to_v.out_features)
        tensors[f"unet.{layer}.to_k.target_output"] = ok
        tensors[f"unet.{layer}.to_v.target_output"] = ov
        outputs[layer] = (ok, ov)
    meta = {"imprint.format": "concept", "imprint.version": "1", "imprint.method": "perfusion",
            "imprint.trigger": trigger, "perfusion.superclass": superclass}
    if beta is not None:
        meta["perfusion.beta"] = str(beta)
    if tau is not None:
        meta["perfusion.tau"] = str(tau)
    file = f"perfusion-{trigger.strip('<>')}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, file), metadata=meta)
    concept = {"i": i, "cinv": cinv, "outputs": outputs, "beta": 0.7 if beta is None else beta,
               "tau": 0.15 if tau is None else tau, "scale": 1.0}
    return file, concept, tid, vec


def perfusion_runs(path, unet_layers, runs, init):
    cases = [
        ("a photo of <teddy> on the beach", None, [("<teddy>", "toy", 7, None, None)]),
        ("a <bear> next to a <mug>", "blurry", [("<bear>", "toy", 9, 0.6, 0.2), ("<mug>", "cup", 8, None, None)]),
    ]
    for r, (prompt, negative, specs) in enumerate(cases):
        pipe = load_pipe(path)
        plain = sample(pipe, prompt.replace("<teddy>", "toy").replace("<bear>", "toy").replace("<mug>", "cup"),
                       negative, init)
        concepts, files = [], []
        for trigger, superclass, seed, beta, tau in specs:
            file, concept, _, _ = perfusion_file(pipe, unet_layers, trigger, superclass, seed, beta, tau)
            concepts.append(concept)
            files.append(file)
        procs = {name: AttnProcessor() for name in pipe.unet.attn_processors}
        for layer in unet_layers:
            procs[layer + ".processor"] = Perfusion(concepts, layer)
        pipe.unet.set_attn_processor(procs)
        result = sample(pipe, prompt, negative, init)
        assert (result - plain).abs().max() > 1e-3, "Perfusion reference equals the plain sample"
        file = f"perfusion_{r}.safetensors"
        save_file({"latents": init, "expected": result.contiguous()}, os.path.join(OUT, file))
        runs.append({"file": file, "concepts": files, "prompt": prompt, "negative_prompt": negative,
                     "scheduler": "ddim", "steps": 8, "guidance": 7.5})


def combined_run(path, unet_layers, runs, init):
    """A P+ concept and a Perfusion concept in one prompt: every layer's own states pass through
    that layer's Perfusion-edited keys and values."""
    prompt = "a photo of xti-cat with a <robot>"
    pipe = load_pipe(path)
    plain = sample(pipe, "a photo of cat with a toy", None, init)
    file, concept, _, _ = perfusion_file(pipe, unet_layers, "<robot>", "toy", 10)
    ids = add_tokens(pipe, ["xti-cat", "xti-cat_1"])
    vectors = load_file(os.path.join(OUT, "xti-cat.safetensors"))
    expanded = prompt.replace("xti-cat", "xti-cat xti-cat_1")
    table = pipe.text_encoder.get_input_embeddings().weight
    uncond = encode(pipe, "")
    procs = {name: AttnProcessor() for name in pipe.unet.attn_processors}
    for layer, key in zip(unet_layers, KOHYA):
        with torch.no_grad():
            table[ids[0]] = vectors[key][0]
            table[ids[1]] = vectors[key][1]
        cond = encode(pipe, expanded)
        procs[layer + ".processor"] = Perfusion([concept], layer, torch.cat([uncond, cond]))
    pipe.unet.set_attn_processor(procs)
    result = sample_with_states(pipe, cond, uncond, init)
    assert (result - plain).abs().max() > 1e-3
    out = "combined_0.safetensors"
    save_file({"latents": init, "expected": result.contiguous()}, os.path.join(OUT, out))
    runs.append({"file": out, "concepts": [file, "xti-cat.safetensors"], "prompt": prompt,
                 "negative_prompt": None, "scheduler": "ddim", "steps": 8, "guidance": 7.5})


def main():
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "model")
    unet = build_model(path)
    layers = attn2_layers(unet)
    assert len(layers) == 16, layers
    torch.manual_seed(0)
    init = torch.randn(1, 4, 8, 8)
    runs = []
    xti_runs(path, layers, runs, init)
    perfusion_runs(path, layers, runs, init)
    combined_run(path, layers, runs, init)
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump({"runs": runs, "attn2_layers": layers}, f, indent=1)
    print(f"wrote {len(runs)} runs to {OUT}")


if __name__ == "__main__":
    main()
