"""The reference side of `imprint bench`: the same UNet step with diffusers/PyTorch on the same
model folder, printing the same JSON line. Pinned versions: tools/reference/requirements.txt.

    python benches/reference/bench.py --model DIR --resolution 256 --batch 1 --iters 3 --mode forward
"""

import argparse
import json
import os
import resource
import time

import torch
from diffusers import UNet2DConditionModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--mode", choices=["forward", "ti", "ti-step", "lora", "dreambooth"], default="forward")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--fused-backward", action="store_true",
                    help="drop each parameter's gradient as soon as it is accumulated (the hook a "
                         "fused optimizer step uses), instead of holding all until the end")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no",
                    help="as diffusers' training scripts: frozen weights in half precision "
                         "(weight_dtype), trained ones in f32, the step under torch.autocast")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    dev = torch.device(a.device)
    half = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[a.mixed_precision]
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet").to(dev)
    unet.requires_grad_(False)
    if half is not None and a.mode != "dreambooth":
        unet.to(half)  # frozen: stored in weight_dtype
    params = []
    if a.mode == "lora":
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # diffusers' cast_training_params: trained LoRA weights in f32
            p.data = p.data.float()
    elif a.mode == "dreambooth":
        unet.requires_grad_(True)
        params = list(unet.parameters())
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if a.fused_backward:
        if not a.gradient_checkpointing or a.mode not in ("lora", "dreambooth"):
            raise SystemExit("--fused-backward needs --gradient-checkpointing and --mode lora or dreambooth")

        def drop_grad(p):
            p.grad = None

        for p in params:
            p.register_post_accumulate_grad_hook(drop_grad)
    unet.train(a.mode in ("lora", "dreambooth"))
    g = torch.Generator().manual_seed(0)
    h = a.resolution // 8
    sample = torch.randn(a.batch, unet.config.in_channels, h, h, generator=g).to(dev)
    t = torch.full((a.batch,), 500.0, device=dev)
    cross = unet.config.cross_attention_dim
    text = torch.randn(a.batch, 77, cross, generator=g).to(dev)

    if a.mode == "ti-step":
        return ti_step(a, unet, dev, sample, t, half)

    autocast = lambda: torch.autocast(dev.type, dtype=half, enabled=half is not None)

    def step():
        if a.mode == "forward":
            with torch.no_grad(), autocast():
                y = unet(sample, t, encoder_hidden_states=text).sample
                y.float().sum().item()
        else:
            states = text.clone().requires_grad_(a.mode == "ti")
            with autocast():
                y = unet(sample, t, encoder_hidden_states=states).sample
            y.float().pow(2).mean().backward()
            if a.mode == "ti":
                states.grad.sum().item()
            for p in params:
                p.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()

    timed(a, step)


def timed(a, step):
    step()  # warm-up
    iter_s = []
    for _ in range(a.iters):
        start = time.perf_counter()
        step()
        iter_s.append(time.perf_counter() - start)
    median = sorted(iter_s)[len(iter_s) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "pytorch", "mode": a.mode, "resolution": a.resolution, "batch": a.batch,
                      "gradient_checkpointing": a.gradient_checkpointing,
                      "mixed_precision": a.mixed_precision,
                      "fused_backward": a.fused_backward, "iter_s": iter_s,
                      "median_s": median, "peak_rss_bytes": peak}))


def ti_step(a, unet, dev, latents, t, half):
    """One step of diffusers' examples/textual_inversion/textual_inversion.py with cached latents:
    the whole embedding table is the optimizer's parameter, other rows restored after the step."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(a.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder").to(dev)
    noise_scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    tokenizer.add_tokens(["<bench-token>"])
    new_id = tokenizer.convert_tokens_to_ids("<bench-token>")
    text_encoder.resize_token_embeddings(len(tokenizer))
    text_encoder.requires_grad_(False)
    embeddings = text_encoder.get_input_embeddings()
    embeddings.requires_grad_(True)
    original = embeddings.weight.data.clone()
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    ids = tokenizer(["a photo of a <bench-token>"] * a.batch, padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(dev)
    noise = torch.randn_like(latents)
    timesteps = torch.full((a.batch,), 500, dtype=torch.int64, device=dev)
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[new_id] = False

    def step():
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(ids)[0]
        with torch.autocast(dev.type, dtype=half, enabled=half is not None):
            pred = unet(noisy, timesteps, states).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            embeddings.weight[keep] = original[keep]
        if dev.type == "cuda":
            torch.cuda.synchronize()

    timed(a, step)


if __name__ == "__main__":
    main()
