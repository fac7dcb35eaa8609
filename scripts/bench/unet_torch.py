#!/usr/bin/env python3
"""One evaluation of diffusers' UNet2DConditionModel with Stable Diffusion 1.5's config and
random weights, on the shapes of `farm bench unet --arch sd15`: latents [B, 4, 64, 64],
timestep 999, text context [B, 77, 768]. Warm-up once, then time --runs evaluations.

Prints JSON: seconds (mean of the timed runs), min_s, runs, peak_rss_mib (VmHWM).
"""
import argparse
import json
import os
import time

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sdpa", choices=["default", "classic"], default="default",
                   help="classic: diffusers' AttnProcessor (no torch SDPA kernel)")
    args = p.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET).to(device=args.device, dtype=dtype).eval()
    if args.sdpa == "classic":
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())
    build_s = time.perf_counter() - t
    params = sum(p.numel() for p in unet.parameters())
    b = args.batch
    sample = torch.randn(b, 4, args.latent, args.latent).to(args.device, dtype)
    context = torch.randn(b, 77, 768).to(args.device, dtype)
    timestep = torch.tensor(999.0)

    def evaluate():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = unet(sample, timestep, encoder_hidden_states=context).sample
            float(out.float().sum())
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warmup = evaluate()
    runs = [evaluate() for _ in range(args.runs)]
    seconds = sum(runs) / len(runs) if runs else warmup
    print(json.dumps({
        "engine": "pytorch",
        "torch": torch.__version__,
        "batch": b,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "attention": args.sdpa,
        "params": params,
        "build_s": round(build_s, 2),
        "warmup_s": round(warmup, 3),
        "seconds": round(seconds, 3),
        "min_s": round(min(runs + [warmup]), 3),
        "runs": [round(r, 3) for r in runs],
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
