#!/usr/bin/env python3
"""Builds the training parity fixtures of farm-diffusion (issue 7).

For each case, a tiny random diffusers UNet2DConditionModel is trained for two steps on
fixed inputs, as diffusers' train_text_to_image.py does it: DDPMScheduler.add_noise,
F.mse_loss(pred, noise or velocity, reduction="mean"), torch.optim.AdamW with PyTorch's
defaults (lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2), no gradient clipping.

Writes crates/farm-diffusion/tests/fixtures/train/<case>/:
  unet/config.json, unet/diffusion_pytorch_model.safetensors   the initial weights (f32)
  scheduler/scheduler_config.json                              the training schedule
  inputs.safetensors    latents (scaled, f32 [2, 4, 8, 8]), encoder_hidden_states
                        (f32 [2, 77, 16]), timesteps (i64 [2]), noise (f32 [2, 4, 8, 8])
  expected.safetensors  loss (f32 [1]), grad.<name> (the first step's gradients),
                        after.<name> (weights after step 1), loss2 and after2.<name> (step 2
                        on the same inputs: checks AdamW's moments and bias correction)

Run from the repository root (needs PyTorch + diffusers + safetensors):
  /var/tmp/parity-venv/bin/python scripts/parity/train_fixtures.py
Then: cargo test -p farm-diffusion --test train_parity
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers import DDPMScheduler, UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/farm-diffusion/tests/fixtures/train"

CASES = {
    # SD 1.x layout: conv projections in the transformers, epsilon prediction.
    "eps": dict(
        unet=dict(
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=2,
            attention_head_dim=2,
            use_linear_projection=False,
        ),
        prediction_type="epsilon",
        timesteps=[17, 733],
    ),
    # SD 2.x layout: linear projections, cross-attention in the last block, v-prediction.
    "vpred": dict(
        unet=dict(
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        ),
        prediction_type="v_prediction",
        timesteps=[999, 0],
    ),
}


def make_case(name, spec):
    out = OUT / name
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1234)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        norm_num_groups=4,
        cross_attention_dim=16,
        **spec["unet"],
    ).float()
    # Move norms and zero biases away from 1 / 0 so that every term matters.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(out / "unet", safe_serialization=True)

    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=spec["prediction_type"],
    )
    sched.save_config(out / "scheduler")

    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, 16, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor(spec["timesteps"], dtype=torch.long)
    save_file(
        {
            "latents": latents,
            "encoder_hidden_states": ehs,
            "timesteps": timesteps,
            "noise": noise,
        },
        out / "inputs.safetensors",
    )

    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet.train()

    def step():
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "epsilon":
            target = noise
        else:
            target = sched.get_velocity(latents, noise, timesteps)
        pred = unet(noisy, timesteps, ehs, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters()}
        opt.step()
        return loss.detach(), grads

    loss, grads = step()
    expected = {"loss": loss.reshape(1)}
    missing = [n for n, gr in grads.items() if gr is None or gr.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"
    for n, p in unet.named_parameters():
        expected[f"grad.{n}"] = grads[n].contiguous()
        expected[f"after.{n}"] = p.detach().clone().contiguous()
    loss2, _ = step()
    expected["loss2"] = loss2.reshape(1)
    for n, p in unet.named_parameters():
        expected[f"after2.{n}"] = p.detach().clone().contiguous()
    save_file(expected, out / "expected.safetensors")
    params = sum(p.numel() for p in unet.parameters())
    print(f"{name}: {params} parameters, loss {loss.item():.6f}, loss2 {loss2.item():.6f}")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name, spec in CASES.items():
        make_case(name, spec)
    (OUT / "README.md").write_text(
        "Written by `scripts/parity/train_fixtures.py`; checked by `tests/train_parity.rs`.\n"
    )


if __name__ == "__main__":
    main()
