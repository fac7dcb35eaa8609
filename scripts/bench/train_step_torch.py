#!/usr/bin/env python3
"""Seconds per UNet training step in PyTorch, for BENCHMARKS.md beside `farm train`.

Loads the UNet of a diffusers-layout model folder (e.g. one `farm model init-tiny` wrote) and
times AdamW steps of the DDPM noise-prediction MSE loss on random latents and text
embeddings, the per-step work of `farm train` (whose VAE and text encodings are computed
once per image and caption).

  /var/tmp/parity-venv/bin/python scripts/bench/train_step_torch.py MODEL_DIR \\
      [--batch 1] [--resolution 64] [--steps 20] [--threads 2]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--resolution", type=int, default=64)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
unet.train()
sched = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
side = a.resolution // 8
latents = torch.randn(a.batch, unet.config.in_channels, side, side)
context = torch.randn(a.batch, 77, unet.config.cross_attention_dim)


def step():
    noise = torch.randn_like(latents)
    t = torch.randint(0, sched.config.num_train_timesteps, (a.batch,))
    pred = unet(sched.add_noise(latents, noise, t), t, context).sample
    loss = F.mse_loss(pred, noise)
    opt.zero_grad()
    loss.backward()
    opt.step()


step()  # warm-up
start = time.perf_counter()
for _ in range(a.steps):
    step()
per_step = (time.perf_counter() - start) / a.steps
print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch}, {a.resolution}px: {per_step:.4f} s/step")
