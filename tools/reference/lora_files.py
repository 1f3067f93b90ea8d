"""LoRA reference files and outputs for imprint's LoRA tests, made with diffusers/peft.

On the `tiny` model (`imprint model init --config tiny --seed 0`, as make_fixtures.py) this script

1. adds a PEFT LoRA (rank 4, alpha 8) to the UNet's attention projections `to_q, to_k, to_v,
   to_out.0` and to the text encoder's `q_proj, k_proj, v_proj, out_proj`, with random non-zero
   `lora_B` (PEFT starts B at zero, which would make every delta vanish), and saves it with
   `StableDiffusionPipeline.save_lora_weights` and the adapter configs as metadata, as diffusers'
   training scripts do (without them diffusers would load alpha = rank) -> `peft.safetensors`;
2. writes the same LoRA under kohya's key names (`lora_unet_<path with _>.lora_down.weight`,
   `.lora_up.weight`, `.alpha`; `lora_te_text_model_…`) -> `kohya.safetensors`, and checks that
   diffusers' `load_lora_weights` reads it to the same outputs;
3. on a fresh pipeline, loads each file with `pipe.load_lora_weights` and saves the UNet and text
   encoder outputs at scale 1.0 and, via `set_adapters(..., adapter_weights=0.5)`, at 0.5, on fixed
   inputs -> `unet_lora.safetensors`, `text_encoder_lora.safetensors`;
4. writes `keys.json`: the key names and shapes diffusers' `save_lora_weights` produced;
5. does the same for a LoCon-style UNet LoRA on convolutions (rank 2, alpha 3) ->
   `conv_peft.safetensors`, `conv_kohya.safetensors`, `unet_conv_lora.safetensors`.

transformers 5.24 asks for peft >= 0.22, which PyPI does not have; its version check is bypassed
(see below) and peft 0.21.2 is pinned.

Pinned versions: tools/reference/requirements.txt. Usage:
    python tools/reference/lora_files.py --imprint target/debug/imprint
"""

import argparse
import json
import os
import subprocess
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import transformers.integrations.peft as _tf_peft

# transformers 5.24 asks for peft >= 0.22, which is not published (PyPI's newest is 0.21.2, pinned);
# its text-encoder adapter path works with 0.21.2, and the outputs are checked against imprint's
# own independent implementation anyway.
_tf_peft.check_peft_version = lambda min_version: None

RANK, ALPHA = 4, 8
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# A LoCon-style LoRA on convolutions (3x3, the stride-2 downsampler, 1x1 proj_in) and the
# feed-forward output: rank 2, alpha 3 (a non-integer scale).
CONV_RANK, CONV_ALPHA = 2, 3
CONV_TARGETS = ["conv1", "conv2", "conv", "proj_in", "ff.net.2"]


def load_pipe(model):
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def randomize_lora(module, gen):
    """Gives every lora_A / lora_B a random non-zero value (PEFT's B starts at zero)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def module_path(key):
    """`unet.down_blocks.0....to_q.lora_A.weight` -> (`unet`, `down_blocks.0....to_q`, `lora_A`)."""
    network, rest = key.split(".", 1)
    path, kind, _ = rest.rsplit(".", 2)
    return network, path, kind


def to_kohya(peft_file, out, alpha=ALPHA, rank=RANK):
    """kohya's names for the same weights: lora_down = lora_A, lora_up = lora_B, alpha per module."""
    tensors = {}
    with safe_open(peft_file, "pt") as f:
        for key in f.keys():
            network, path, kind = module_path(key)
            if network == "text_encoder" and not path.startswith("text_model."):
                # transformers 5 modules have no `text_model.` level; kohya names always do.
                path = "text_model." + path
            prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[network] + path.replace(".", "_")
            tensors[f"{prefix}.{ {'lora_A': 'lora_down', 'lora_B': 'lora_up'}[kind] }.weight"] = f.get_tensor(key)
            tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    save_file(tensors, out, metadata=meta)


def outputs(pipe, inputs):
    with torch.no_grad():
        unet = pipe.unet(inputs["sample"], inputs["timestep"],
                         encoder_hidden_states=inputs["encoder_hidden_states"]).sample
        te = pipe.text_encoder(inputs["input_ids"])
    return unet, te.last_hidden_state, te.pooler_output


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imprint", default="target/debug/imprint")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "../../tests/fixtures/lora"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp()
    model = os.path.join(tmp, "tiny")
    subprocess.run([args.imprint, "model", "init", "--config", "tiny", "--seed", "0", "--out", model], check=True)

    # 1. the PEFT LoRA, saved as diffusers' training scripts save it.
    pipe = load_pipe(model)
    gen = torch.Generator().manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS))
    pipe.text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS))
    randomize_lora(pipe.unet, gen)
    randomize_lora(pipe.text_encoder, gen)
    peft_file = os.path.join(args.out, "peft.safetensors")
    StableDiffusionPipeline.save_lora_weights(
        args.out,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
        weight_name="peft.safetensors",
    )
    with safe_open(peft_file, "pt") as f:
        keys = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    with open(os.path.join(args.out, "keys.json"), "w") as f:
        json.dump(keys, f, indent=1, sort_keys=True)

    # 2. the kohya file.
    kohya_file = os.path.join(args.out, "kohya.safetensors")
    to_kohya(peft_file, kohya_file)

    # 3. reference outputs with the LoRA loaded by diffusers.
    g = torch.Generator().manual_seed(1)
    d = pipe.unet.config.cross_attention_dim
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, d, generator=g),
        "input_ids": pipe.tokenizer(["a photo of a cat", "a dog"], padding="max_length", max_length=77,
                                    return_tensors="pt").input_ids,
    }
    results = {}
    for name, path in [("peft", peft_file), ("kohya", kohya_file)]:
        pipe = load_pipe(model)
        pipe.load_lora_weights(path, adapter_name="x")
        full = outputs(pipe, inputs)
        pipe.set_adapters(["x"], adapter_weights=0.5)
        half = outputs(pipe, inputs)
        results[name] = (full, half)
    base = outputs(load_pipe(model), inputs)
    for a, b in zip(results["peft"][0] + results["peft"][1], results["kohya"][0] + results["kohya"][1]):
        assert torch.allclose(a, b, atol=1e-6), "diffusers reads the kohya file differently"
    (u1, h1, p1), (u05, h05, p05) = results["peft"]
    assert (u1 - base[0]).abs().max() > 1e-3, "the LoRA does not change the UNet output"
    assert (h1 - base[1]).abs().max() > 1e-3, "the LoRA does not change the text encoder output"
    save_file({"sample": inputs["sample"], "timestep": inputs["timestep"],
               "encoder_hidden_states": inputs["encoder_hidden_states"]}, os.path.join(args.out, "unet_in.safetensors"))
    save_file({"input_ids": inputs["input_ids"]}, os.path.join(args.out, "text_encoder_in.safetensors"))
    save_file({"sample_1": u1, "sample_05": u05, "sample_base": base[0]},
              os.path.join(args.out, "unet_lora.safetensors"))
    save_file({"last_hidden_state_1": h1, "pooler_output_1": p1, "last_hidden_state_05": h05,
               "pooler_output_05": p05}, os.path.join(args.out, "text_encoder_lora.safetensors"))
    # 5. the conv LoRA: saved by diffusers, converted to kohya names, outputs at scale 1.
    pipe = load_pipe(model)
    pipe.unet.add_adapter(LoraConfig(r=CONV_RANK, lora_alpha=CONV_ALPHA, target_modules=CONV_TARGETS))
    randomize_lora(pipe.unet, torch.Generator().manual_seed(2))
    StableDiffusionPipeline.save_lora_weights(
        args.out,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        weight_name="conv_peft.safetensors",
    )
    to_kohya(os.path.join(args.out, "conv_peft.safetensors"), os.path.join(args.out, "conv_kohya.safetensors"),
             alpha=CONV_ALPHA, rank=CONV_RANK)
    conv = []
    for name in ["conv_peft", "conv_kohya"]:
        pipe = load_pipe(model)
        pipe.load_lora_weights(os.path.join(args.out, name + ".safetensors"), adapter_name="c")
        conv.append(outputs(pipe, inputs)[0])
    assert torch.allclose(conv[0], conv[1], atol=1e-6), "diffusers reads the conv kohya file differently"
    assert (conv[0] - base[0]).abs().max() > 1e-3, "the conv LoRA does not change the UNet output"
    save_file({"sample_1": conv[0]}, os.path.join(args.out, "unet_conv_lora.safetensors"))

    import diffusers, peft, transformers
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump({"rank": RANK, "alpha": ALPHA, "unet_targets": UNET_TARGETS, "te_targets": TE_TARGETS,
                   "conv_rank": CONV_RANK, "conv_alpha": CONV_ALPHA, "conv_targets": CONV_TARGETS,
                   "torch": torch.__version__, "diffusers": diffusers.__version__,
                   "transformers": transformers.__version__, "peft": peft.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
