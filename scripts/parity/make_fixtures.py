#!/usr/bin/env python3
"""Builds the diffusers parity fixtures of farm-diffusion.

Writes crates/farm-diffusion/tests/fixtures/parity/:
  model/                 a tiny random Stable Diffusion 1.x model in diffusers layout
                         (save_pretrained; fp16 weights, computed in fp32 on both sides)
  init.png, mask.png     the init image and inpainting mask (64x64)
  embed.safetensors      input_ids (i64 [n, 77]) and embeddings (f32 [n, 77, 32]) of the
                         prompts in cases.json
  <case>.noise.safetensors  the fixed `noise` (and `vae_noise`) of each case
  <case>.png             diffusers' output(s) for the case (<case>_<i>.png for batches)
  cases.json             every case's parameters

Run from the repository root (needs PyTorch + diffusers + transformers from PyPI):
  python3 -m venv /tmp/parity && /tmp/parity/bin/pip install torch diffusers transformers safetensors pillow
  /tmp/parity/bin/python scripts/parity/make_fixtures.py
Then: cargo test -p farm-diffusion --test parity
"""
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipelineLegacy,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders import vae as vae_module
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/farm-diffusion/tests/fixtures/parity"
BPE = ROOT / "crates/farm-diffusion/assets/bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary truncated to its first MERGES merges keeps the fixture small; ids of
# the bytes and of the first merges are the real CLIP ids.
MERGES = 2000

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(d: Path):
    d.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(BPE, "rt", encoding="utf-8").read().split("\n")[1 : 1 + MERGES]
    merges = [tuple(l.split()) for l in lines]
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    eos = "<|endoftext|>"
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": eos, "pad_token": eos, "unk_token": eos})
    )
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": eos,
                "pad_token": eos,
                "unk_token": eos,
                "model_max_length": 77,
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    return len(vocab)


def perturb(module: torch.nn.Module, seed: int):
    """Moves norm weights/biases off their 1/0 init so that every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_model(d: Path):
    if d.exists():
        shutil.rmtree(d)
    tok_dir = d / "tokenizer"
    vocab_size = write_tokenizer(tok_dir)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            projection_dim=32,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    # Four blocks: the latents are 1/8 of the image, as in SD.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    perturb(text_encoder, 1)
    perturb(unet, 2)
    perturb(vae, 3)
    # Make the random UNet behave more like a trained one: noise predictions of about unit
    # variance and a text condition that matters, so that the images depend strongly on
    # every step (one step fewer then fails the 45 dB bar).
    with torch.no_grad():
        unet.conv_out.weight.mul_(2.5)
        unet.conv_out.bias.mul_(2.5)
        for name, p in unet.named_parameters():
            if ".attn2.to_v." in name:
                p.mul_(4.0)
    # SD 1.5's scheduler config.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(d, safe_serialization=True)
    # Keep our own tokenizer files only (vocab.json + merges.txt + the two JSONs).
    for f in (d / "tokenizer").iterdir():
        if f.name not in {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}:
            f.unlink()
    write_tokenizer(tok_dir)
    # SD 1.5's scheduler_config.json also says clip_sample false (PNDMScheduler does not
    # store the key itself; DDIMScheduler.from_config would otherwise default it to true).
    sched = d / "scheduler/scheduler_config.json"
    config = json.loads(sched.read_text())
    config["clip_sample"] = False
    sched.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load(d: Path):
    pipe = StableDiffusionPipeline.from_pretrained(d, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_u8(images: np.ndarray) -> list:
    """diffusers' numpy_to_pil: (x * 255).round() as uint8."""
    return [(img * 255).round().astype("uint8") for img in images]


def save_pngs(name: str, images: np.ndarray):
    imgs = to_u8(images)
    files = []
    for i, img in enumerate(imgs):
        fname = f"{name}.png" if len(imgs) == 1 else f"{name}_{i}.png"
        Image.fromarray(img).save(OUT / fname)
        files.append(fname)
    return files


def randn(seed: int, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def init_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32) / 63.0
    r = 0.5 + 0.5 * np.sin(6.0 * x + 2.0 * y)
    g = y
    b = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.09).astype(np.float32) * 0.8 + 0.1
    arr = (np.stack([r, g, b], axis=-1) * 255).round().astype("uint8")
    return Image.fromarray(arr)


def mask_image() -> Image.Image:
    arr = np.zeros((64, 64), dtype=np.uint8)
    arr[16:48, 8:40] = 255  # white = repaint
    return Image.fromarray(arr).convert("RGB")


class Patched:
    """Feeds fixed noise to diffusers: `randn_tensor` in a pipeline module returns `noise`,
    and the VAE posterior samples `mean + std * vae_noise`."""

    def __init__(self, module, noise, vae_noise):
        self.module, self.noise, self.vae_noise = module, noise, vae_noise

    def __enter__(self):
        self.old_randn = self.module.randn_tensor
        self.old_sample = vae_module.DiagonalGaussianDistribution.sample
        noise, vae_noise = self.noise, self.vae_noise

        def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
            assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
            return noise.clone()

        def fake_sample(dist, generator=None):
            return dist.mean + dist.std * vae_noise[: dist.mean.shape[0]]

        self.module.randn_tensor = fake_randn
        vae_module.DiagonalGaussianDistribution.sample = fake_sample

    def __exit__(self, *exc):
        self.module.randn_tensor = self.old_randn
        vae_module.DiagonalGaussianDistribution.sample = self.old_sample


SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = OUT / "model"
    build_model(model_dir)
    pipe = load(model_dir)
    base_config = pipe.scheduler.config

    # Text embeddings.
    prompts = [PROMPT, "", NEGATIVE]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "embeddings": emb.float().contiguous()}, OUT / "embed.safetensors")

    init = init_image()
    mask = mask_image()
    init.save(OUT / "init.png")
    mask.save(OUT / "mask.png")

    cases = []

    def case(name, mode="txt2img", scheduler="pndm", width=64, height=64, steps=10, guidance=7.5,
             negative=NEGATIVE, num_images=1, strength=0.75, seed=0):
        h, w = height // 8, width // 8
        noise = randn(seed, (num_images, 4, h, w))
        vae_noise = randn(seed + 1000, (num_images, 4, h, w))
        tensors = {"noise": noise}
        pipe.scheduler = SCHEDULERS[scheduler].from_config(base_config)
        common = dict(prompt=[PROMPT] * num_images, negative_prompt=[negative] * num_images if negative else None,
                      num_inference_steps=steps, guidance_scale=guidance, output_type="np")
        with torch.no_grad():
            if mode == "txt2img":
                out = pipe(height=height, width=width, latents=noise, **common).images
            elif mode == "img2img":
                tensors["vae_noise"] = vae_noise
                p = StableDiffusionImg2ImgPipeline(**pipe.components)
                p.set_progress_bar_config(disable=True)
                from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as m
                with Patched(m, noise, vae_noise):
                    out = p(image=init, strength=strength, **common).images
            elif mode == "inpaint":
                tensors["vae_noise"] = vae_noise
                keys = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")
                p = StableDiffusionInpaintPipelineLegacy(**{k: pipe.components[k] for k in keys},
                                                         requires_safety_checker=False)
                p.set_progress_bar_config(disable=True)
                from diffusers.pipelines.deprecated.stable_diffusion_variants import (
                    pipeline_stable_diffusion_inpaint_legacy as m,
                )
                with Patched(m, noise, vae_noise):
                    out = p(image=init, mask_image=mask, strength=strength, **common).images
            elif mode == "reconstruct":
                tensors = {"vae_noise": vae_noise}
                x = torch.from_numpy(np.array(init).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
                x = 2.0 * x - 1.0
                dist = pipe.vae.encode(x).latent_dist
                z = dist.mean + dist.std * vae_noise
                img = pipe.vae.decode(z).sample
                out = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
            else:
                raise ValueError(mode)
        save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / f"{name}.noise.safetensors")
        files = save_pngs(name, out)
        cases.append(dict(name=name, mode=mode, scheduler=scheduler, width=width, height=height, steps=steps,
                          guidance=guidance, prompt=PROMPT, negative_prompt=negative or "", num_images=num_images,
                          strength=strength, noise=f"{name}.noise.safetensors", expected=files,
                          init_image="init.png" if mode != "txt2img" else None,
                          mask="mask.png" if mode == "inpaint" else None))

    case("txt2img_pndm", scheduler="pndm")
    case("txt2img_ddim", scheduler="ddim", seed=1)
    case("txt2img_dpm", scheduler="dpm++", seed=2)
    case("txt2img_nonsquare", scheduler="pndm", width=64, height=40, seed=3)
    case("txt2img_batch2", scheduler="ddim", num_images=2, seed=4)
    case("txt2img_guidance1", scheduler="dpm++", guidance=1.0, negative=None, seed=5)
    case("img2img_pndm", mode="img2img", scheduler="pndm", strength=0.75, seed=6)
    case("img2img_dpm", mode="img2img", scheduler="dpm++", strength=0.5, seed=7)
    case("inpaint_ddim", mode="inpaint", scheduler="ddim", strength=0.8, seed=8)
    case("reconstruct", mode="reconstruct", seed=9)

    (OUT / "cases.json").write_text(json.dumps({
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "prompts": prompts,
        "cases": cases,
    }, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
