"""The toy world's models: a small SD1.5-layout pipeline (`toy-sd`), a small CLIP scorer (`toyclip`) and a small
SD3-layout flow-matching pipeline (`toy-sd3`, experiments/toyworld_pretrain_flow.sh) built on toy-sd's VAE and text
encoder; and a small Wan 2.1-layout text-to-video pipeline (`toy-wan`, experiments/toyworld_pretrain_wan.sh: its own
video VAE trained on the clips of `utils/toy/video_world.py`, a random frozen UMT5 encoder, its transformer trained
by train_dpo.py --sft on the pre-encoded clips).

All three image models are trained here, offline, on the captioned images of `utils/toy/world.py`, and committed under
`utils/toy/assets/` (toy-sd and toyclip a few MB each, toy-sd3 16 MB: its two CLIP slots hold copies of toy-sd's
text encoder). `experiments/toyworld_pretrain.sh` runs toy-sd's and toyclip's whole chain,
`experiments/toyworld_pretrain_flow.sh` toy-sd3's:

1. data:     python -m utils.toy.world --output_dir DATA --num_images N --seed 0
2. CLIPs:    python -m utils.toy.models train-clip --data DATA --seed 0 --out TEXT_CLIP
             (its text tower becomes the pipeline's text encoder, as SD1.5 uses CLIP ViT-L's)
             python -m utils.toy.models train-clip --data DATA --seed 1 --out utils/toy/assets/toyclip
             (an independent CLIP: the scorer, so the reward is not the generator's own text encoder)
3. VAE:      python -m utils.toy.models train-vae --data DATA --from_tiny_vae --out VAE_DIR
4. pipeline: python -m utils.toy.models init-pipeline --vae VAE_DIR --text_clip TEXT_CLIP --out INIT
             (random UNet), then the UNet is trained by the project's own SFT:
             train_dpo.py --sft --pretrained_model_name_or_path INIT --dataset_name DATA --image_column image
             --caption_column text --no_hflip ... --output_dir SFT
             python -m utils.toy.models finish-pipeline --init INIT --unet SFT --out utils/toy/assets/toy-sd

The tokenizer is CLIP's own byte-level BPE restricted to the merges that the toy world's words use (plus
every single byte), so any English text still tokenizes (unknown words fall apart into characters) while the
embedding table has ~800 rows instead of 49408: that is what keeps the text models at a few MB.
"""
import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..rewards import ImagePrep, prepare_pixels
from . import world
from .names import TOY_SD_PATH

TEXT_WIDTH = 128  # text encoder width = the UNet's cross_attention_dim
IMAGE_SIZE = world.RESOLUTION


# --------------------------------------------------------------------------- tokenizer
def toy_words():
    """Every word the toy world's captions and prompt sets use."""
    words = {"a", "an", "one", "on", "the", "background", "of", "photo", "image", "drawing", "picture", "and"}
    words.update(world.COUNT_WORDS.values())
    words.update(world.COLORS, world.BACKGROUNDS)
    words.update(world.SHAPES, (s + "s" for s in world.SHAPES))
    for phrase in world.REGION_WORDS.values():
        words.update(phrase.split())
    return sorted(words)


def _bpe_merges_used(word: str, ranks: dict) -> list:
    """The merges CLIP's BPE applies to `word` (lower-case, no spaces), in the order it applies them."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def save_toy_tokenizer(folder):
    """A CLIPTokenizer (max length 77) over the byte alphabet plus the merges of `toy_words()`, saved in `folder`.

    BPE with a subset of the merge list gives the same tokens as the full list on any word whose merges are all
    in the subset (it always applies the lowest-ranked merge present, and ranks keep their order), so the toy
    words tokenize exactly as CLIP tokenizes them.
    """
    from transformers import CLIPTokenizer

    from .tiny import _bytes_to_unicode, _clip_vocab_and_merges

    _, merges = _clip_vocab_and_merges()
    ranks = {m: i for i, m in enumerate(merges)}
    used = {m for w in toy_words() for m in _bpe_merges_used(w, ranks)}
    kept = [m for m in merges if m in used]  # original order = original ranks
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in kept] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in kept) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


# --------------------------------------------------------------------------- CLIP (text encoder and scorer)
def clip_config(tokenizer):
    from transformers import CLIPConfig

    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, max_position_embeddings=77)
    text = dict(hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3, num_attention_heads=4, **special)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def load_dataset_tensors(data_dir: str):
    """(images uint8 (N, 3, 64, 64), captions list[str]) of a toy-world datasets folder."""
    import datasets

    ds = datasets.load_from_disk(data_dir).with_format("numpy", columns=["image"], output_all_columns=True)
    images = torch.from_numpy(np.stack(ds["image"])).permute(0, 3, 1, 2).contiguous()
    return images, list(ds["text"])


def clip_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    # 64 px in, 64 px to the vision tower: generated images go through with no resize at all
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_clip(images, captions, tokenizer, steps=4000, batch_size=512, lr=5e-4, device="cpu", seed=0, log_every=500):
    """Contrastive (InfoNCE, both directions) training of a small CLIP on image-caption pairs.

    Images get a little Gaussian pixel noise (sigma up to 0.04 in [0, 1]) so that the scorer also reads the
    slightly soft images a diffusion model makes, not only clean renders."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(tokenizer)).to(device).train()
    processor = clip_processor(tokenizer)
    prep = ImagePrep.from_clip_processor(processor.image_processor)  # what the toyclip scorer does to a tensor
    tokens = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    images, tokens = images.to(device), tokens.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator).to(device)
        x = images[idx].float() / 255
        x = (x + torch.rand(batch_size, 1, 1, 1, device=device) * 0.04 * torch.randn_like(x)).clamp(0, 1)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
            out = model(input_ids=tokens[idx], pixel_values=prepare_pixels(x, prep))
        logits = out.logits_per_image.float()  # (B, B): logit_scale * cos
        # several rows can share a caption: every matching caption counts as a positive
        same = (tokens[idx][:, None, :] == tokens[idx][None, :, :]).all(-1).float()
        loss = 0.5 * (soft_ce(logits, same) + soft_ce(logits.t(), same))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps - 1:
            acc = (logits.argmax(1) == torch.arange(batch_size, device=device)).float().mean().item()
            print(f"clip step {step} loss {loss.item():.4f} top1 {acc:.3f} scale {model.logit_scale.exp().item():.1f}", flush=True)
    return model.eval().cpu(), processor


def soft_ce(logits, targets):
    """Cross-entropy against the rows of `targets` normalised to sum 1."""
    return -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()


@torch.no_grad()
def retrieval_accuracy(model, processor, images, captions, n=1000, device="cpu"):
    """Held-out check: for each of n images, is its own caption (or an identical one) the best of the n?"""
    model = model.to(device)
    pixels = prepare_pixels(images[:n].float().div(255).to(device), ImagePrep.from_clip_processor(processor.image_processor))
    tok = processor.tokenizer(captions[:n], padding="max_length", max_length=77, return_tensors="pt")["input_ids"].to(device)
    logits = model(input_ids=tok, pixel_values=pixels).logits_per_image
    best = logits.argmax(1)
    return sum(captions[int(b)] == captions[i] for i, b in enumerate(best)) / len(best)


# --------------------------------------------------------------------------- the pipeline
def toy_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,  # 4.2 M parameters
        block_out_channels=(32, 64, 128), norm_num_groups=16, cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def build_toy_pipeline(vae_dir: str, text_clip_dir: str, unet=None, seed: int = 0):
    """StableDiffusionPipeline: the trained VAE, the text tower of a trained CLIP, a UNet (random if None)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTextModel

    from .tiny import _scheduler

    torch.manual_seed(seed)
    clip = CLIPModel.from_pretrained(text_clip_dir)
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5: CLIPModel.text_model is a CLIPTextModel; 4.x: both hold a CLIPTextTransformer as text_model
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_toy_tokenizer(tmp)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet if unet is not None else toy_unet(), scheduler=_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def toy_flow_transformer():
    """SD3's MMDiT at the toy world's size: 256 image tokens (32x32 latents, 2x2 patches), width 128, 6 joint
    blocks (3.4 M parameters, about the toy UNet's size)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=128,
        pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=IMAGE_SIZE // 4,
    )


def build_toy_flow_pipeline(toy_sd_dir: str, transformer=None, seed: int = 0):
    """StableDiffusion3Pipeline around toy-sd's trained VAE and text encoder, with a flow transformer (random if None).

    SD3 reads two CLIP text towers and T5. Both CLIP slots hold toy-sd's text encoder, with an identity projection
    for the pooled output (toy-sd's encoder has none); the T5 slot holds a one-layer random T5 over characters, whose
    width is SD3's joint width (the two CLIPs' hidden states side by side, 2 x 128). The scheduler is SD3's flow
    matching with shift 1: SD3's shift 3 is for 4096 image tokens, the toy world has 256."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, \
        T5EncoderModel

    from .tiny import build_t5_tokenizer

    torch.manual_seed(seed)
    source = CLIPTextModel.from_pretrained(toy_sd_dir, subfolder="text_encoder")
    config = CLIPTextConfig(**{**source.config.to_dict(), "projection_dim": source.config.hidden_size})

    def clip_with_projection():
        encoder = CLIPTextModelWithProjection(config)
        # transformers 5's CLIPTextModel is the text transformer itself (4.x nests it as .text_model, as here)
        getattr(encoder.text_model, "text_model", encoder.text_model).load_state_dict(
            getattr(source, "text_model", source).state_dict())
        with torch.no_grad():
            encoder.text_projection.weight.copy_(torch.eye(config.hidden_size))
        return encoder

    t5_tokenizer = build_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=2 * TEXT_WIDTH, d_kv=32, d_ff=256, num_layers=1,
                                 num_heads=4, is_encoder_decoder=False))
    vae = AutoencoderKL.from_pretrained(toy_sd_dir, subfolder="vae")
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline reads it; toy-sd's VAE has none
    tokenizer = CLIPTokenizer.from_pretrained(toy_sd_dir, subfolder="tokenizer")
    return StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else toy_flow_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0), vae=vae,
        text_encoder=clip_with_projection(), tokenizer=tokenizer, text_encoder_2=clip_with_projection(),
        tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def finish_pipeline(init_dir: str, sft_dir: str, out_dir: str):
    """Copy the initial pipeline to `out_dir` with the SFT-trained denoiser (sft_dir/unet, or sft_dir/transformer
    for the flow and video pipelines) in place of the random one.

    The denoiser is stored in float16 (half the size to commit); diffusers' from_pretrained loads it back as float32.
    The text encoders stay float32: transformers 5 would load float16 weights as float16."""
    import diffusers

    subfolder = "transformer" if (Path(sft_dir) / "transformer").is_dir() else "unet"
    # the denoiser's own class (SD3Transformer2DModel, WanTransformer3DModel, UNet2DConditionModel), from its config
    cls = getattr(diffusers, json.loads((Path(sft_dir) / subfolder / "config.json").read_text())["_class_name"])
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-", dir=Path(out_dir).parent))
    shutil.copytree(init_dir, tmp, dirs_exist_ok=True)
    shutil.rmtree(tmp / subfolder)
    cls.from_pretrained(sft_dir, subfolder=subfolder).half().save_pretrained(tmp / subfolder)
    if Path(out_dir).exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


# --------------------------------------------------------------------------- the video pipeline (toy-wan)
WAN_TEXT_WIDTH = 128  # the UMT5 encoder's width = the transformer's text_dim
WAN_Z_DIM = 8


def toy_wan_vae():
    """Wan's causal 3D VAE (AutoencoderKLWan) at the toy world's size: base width 16, 8 latent channels, two levels
    that each halve the side and the time after the first frame (4x spatial, 4x temporal as Wan's: 1 + 4k frames ->
    1 + k latent frames). 0.64 M parameters. Wan's 8x would leave 8x8 latents of a 64 px frame, where a 6.5 px
    triangle is one latent pixel; at 4x a 64 px clip is 16x16 latents, 8x8 tokens per latent frame."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=16, z_dim=WAN_Z_DIM, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[True, True], latents_mean=[0.0] * WAN_Z_DIM,
                            latents_std=[1.0] * WAN_Z_DIM, scale_factor_spatial=4, scale_factor_temporal=4)


def load_clip_tensors(data_dir: str, max_clips=None):
    """(clips uint8 (N, F, H, W, 3), captions list[str]) of a toy video folder (python -m utils.toy.video_world)."""
    from .video_world import read_mp4

    rows = [json.loads(line) for line in (Path(data_dir) / "captions.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:max_clips] if max_clips else rows
    clips = np.stack([read_mp4(str(Path(data_dir) / row["file"])) for row in rows])
    return torch.from_numpy(clips), [row["caption"] for row in rows]


def _clips_to_pixels(clips: torch.Tensor) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def train_wan_vae(clips: torch.Tensor, steps: int = 3000, batch_size: int = 16, lr: float = 1e-3, device: str = "cpu",
                  seed: int = 0, log_every: int = 250):
    """Train `toy_wan_vae()` as an autoencoder on toy clips (uint8 (N, F, H, W, 3)): MSE + a small KL (1e-6), as the
    tiny image VAE (utils.toy.tiny.train_tiny_vae). Afterwards Wan's per-channel latents_mean / latents_std are set
    to the posterior means' statistics over up to 256 clips, so that the transformer sees unit-variance latents.

    Train on clips of the length the pipeline will encode and decode: the causal convolutions carry a cache from one
    chunk of 4 frames to the next, and a VAE trained on 5 frames (the first and one chunk) decoded frames 5-8 of a
    9-frame clip with 3-10 times the error of frames 0-4."""
    torch.manual_seed(seed)
    vae = toy_wan_vae().to(device).train()
    clips = clips.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        x = _clips_to_pixels(clips[torch.randint(len(clips), (batch_size,), generator=generator).to(device)])
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
        loss = (reconstruction.float() - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"wan vae step {step} loss {loss.item():.5f}", flush=True)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(_clips_to_pixels(clips[i:i + 16])).latent_dist.mode()
                           for i in range(0, min(256, len(clips)), 16)])  # (n, C, f, h, w)
    vae.register_to_config(latents_mean=means.mean((0, 2, 3, 4)).tolist(), latents_std=means.std((0, 2, 3, 4)).tolist())
    return vae.cpu()


@torch.no_grad()
def wan_reconstruction_accuracy(vae, clips: torch.Tensor, captions: list, batch_size: int = 16, device: str = "cpu"):
    """(the toy video judge's accuracy (`all`) on the VAE's reconstructions of `clips`, the same on the clips
    themselves, pixel MSE in [-1, 1]): whether a model trained in this latent space can be judged at all."""
    from .video_world import clip_accuracy

    vae = vae.to(device).eval()
    right, right_clean, errors = 0.0, 0.0, []
    for i in range(0, len(clips), batch_size):
        x = _clips_to_pixels(clips[i:i + batch_size]).to(device)
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)  # (B, 3, F, H, W)
        errors.append((out - x).pow(2).mean((1, 2, 3, 4)).cpu())
        for video, clean, caption in zip(out.add(1).div(2).permute(0, 2, 1, 3, 4).cpu(), clips[i:i + batch_size],
                                         captions[i:i + batch_size]):
            right += clip_accuracy(video, caption)["all"]  # video: (F, 3, H, W) in [0, 1]
            right_clean += clip_accuracy(clean.numpy(), caption)["all"]
    return right / len(clips), right_clean / len(clips), torch.cat(errors).mean().item()


def toy_wan_transformer():
    """Wan 2.1's DiT (WanTransformer3DModel) at the toy world's size: width 128 (4 heads of 32, which its rotary
    embedding splits into 12 temporal and 10 + 10 spatial channels), 6 blocks, 1x2x2 patches over the VAE's 8
    channels: 64 tokens per latent frame of a 64 px clip. 1.8 M parameters."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=WAN_Z_DIM,
        out_channels=WAN_Z_DIM, text_dim=WAN_TEXT_WIDTH, freq_dim=64, ffn_dim=512, num_layers=6, rope_max_seq_len=64,
    )


def build_toy_wan_pipeline(vae_dir: str, transformer=None, seed: int = 0):
    """WanPipeline around the trained toy VAE, a random transformer (unless given) and a random 2-layer UMT5 encoder
    over the character-level T5 tokenizer (utils.toy.tiny.build_t5_tokenizer). The text encoder stays at its random
    init and frozen: pre-encoding (python -m utils.preencode) stores its embeddings once, and a random T5 over
    characters still gives every caption its own token sequence for the cross-attention to learn to read.
    The scheduler is Wan's (UniPC over flow sigmas) with flow_shift 1: Wan's 3.0 is for 480p's 32,760 tokens a clip,
    a 64 px clip of 9 frames has 192."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny import build_t5_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=WAN_TEXT_WIDTH, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=1.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=AutoencoderKLWan.from_pretrained(vae_dir),
                       scheduler=scheduler, transformer=transformer if transformer is not None else toy_wan_transformer())


# --------------------------------------------------------------------------- command line
def main(argv=None):
    parser = argparse.ArgumentParser(description="train the toy world's VAE and CLIPs, and assemble its pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def trainer(name, help, out_help, steps, batch_size, lr):
        p = sub.add_parser(name, help=help)
        p.add_argument("--data", required=True, help="a toy-world datasets folder (python -m utils.toy.world)")
        p.add_argument("--out", required=True, help=out_help)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--batch_size", type=int, default=batch_size)
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--seed", type=int, default=0)
        return p

    p = trainer("train-vae", "the VAE (utils.toy.tiny's architecture) on the toy world's images",
                "folder for AutoencoderKL.save_pretrained", 6000, 128, 1e-3)
    p.add_argument("--from_tiny_vae", action="store_true",
                   help="fine-tune the committed tiny VAE (utils/toy/assets/tiny_vae.safetensors) instead of a random init")
    p = trainer("train-clip", "a small CLIP, contrastively, on the toy world's image-caption pairs",
                "folder for CLIPModel + CLIPProcessor save_pretrained", 4000, 512, 5e-4)
    p.add_argument("--held_out", type=int, default=2000, help="last N rows kept out of training, for the retrieval check")
    p = sub.add_parser("init-pipeline", help="a pipeline folder with the trained VAE and text encoder, random UNet")
    p.add_argument("--vae", required=True)
    p.add_argument("--text_clip", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("init-flow-pipeline", help="an SD3-layout pipeline with toy-sd's VAE and text encoder, random "
                                                  "flow transformer")
    p.add_argument("--toy_sd", default=str(TOY_SD_PATH), help="the pipeline whose VAE and text encoder to reuse")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train-wan-vae", help="Wan's video VAE (toy_wan_vae) on toy video clips, then the toy video "
                                             "judge's accuracy on its reconstructions of held-out clips")
    p.add_argument("--data", required=True, help="a toy video folder (python -m utils.toy.video_world)")
    p.add_argument("--out", required=True, help="folder for AutoencoderKLWan.save_pretrained")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=16, help="clips per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_clips", type=int, default=4000, help="train on the first N clips of the folder (in memory)")
    p.add_argument("--held_out", type=int, default=200, help="of those, the last N are kept out for the judge check")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("init-wan-pipeline", help="a WanPipeline folder with the trained video VAE, a random UMT5 "
                                                 "encoder and a random transformer")
    p.add_argument("--vae", required=True, help="output of train-wan-vae")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("finish-pipeline", help="the initial pipeline with the SFT-trained UNet or transformer")
    p.add_argument("--init", required=True)
    p.add_argument("--unet", required=True, help="output_dir of train_dpo.py --sft (holds unet/ or transformer/)")
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.command == "train-vae":
        from .tiny import train_tiny_vae

        images, _ = load_dataset_tensors(args.data)
        images = images.to(device)

        def sample_images(n, generator):
            return images[torch.randint(len(images), (n,), generator=generator).to(device)].float() / 255

        vae, scaling_factor, mse = train_tiny_vae(args.steps, args.batch_size, args.lr, device=device, seed=args.seed,
                                                  sample_images=sample_images, from_pretrained=args.from_tiny_vae)
        vae.register_to_config(scaling_factor=scaling_factor)
        vae.save_pretrained(args.out)
        print(f"saved {args.out}: scaling_factor {scaling_factor:.4f}, reconstruction MSE {mse:.5f} (in [-1,1])")
    elif args.command == "train-clip":
        images, captions = load_dataset_tensors(args.data)
        n = len(images) - min(args.held_out, len(images) // 10)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = save_toy_tokenizer(tmp)
        model, processor = train_clip(images[:n], captions[:n], tokenizer, args.steps, args.batch_size, args.lr,
                                      device=device, seed=args.seed)
        acc = retrieval_accuracy(model, processor, images[n:], captions[n:], device=device)
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)
        print(f"saved {args.out}: held-out retrieval top-1 {acc:.3f} among {min(1000, len(images) - n)} captions")
    elif args.command == "init-pipeline":
        build_toy_pipeline(args.vae, args.text_clip, seed=args.seed).save_pretrained(args.out)
        print(f"saved {args.out}")
    elif args.command == "train-wan-vae":
        clips, captions = load_clip_tensors(args.data, args.max_clips)
        n = len(clips) - max(1, min(args.held_out, len(clips) // 10))
        vae = train_wan_vae(clips[:n], args.steps, args.batch_size, args.lr, device=device, seed=args.seed)
        vae.save_pretrained(args.out)
        acc, clean, mse = wan_reconstruction_accuracy(vae, clips[n:], captions[n:], device=device)
        print(f"saved {args.out}: on {len(clips) - n} held-out clips the toy video judge reads {acc:.3f} of the "
              f"reconstructions right ({clean:.3f} of the clips themselves), reconstruction MSE {mse:.5f} (in [-1,1])")
    elif args.command == "init-wan-pipeline":
        build_toy_wan_pipeline(args.vae, seed=args.seed).save_pretrained(args.out)
        print(f"saved {args.out}")
    elif args.command == "init-flow-pipeline":
        build_toy_flow_pipeline(args.toy_sd, seed=args.seed).save_pretrained(args.out)
        print(f"saved {args.out}")
    else:
        finish_pipeline(args.init, args.unet, args.out)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
