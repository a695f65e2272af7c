"""Tiny SD1.5-, SD 2.x- (v-prediction), SDXL-, SD3-, FLUX- and Wan 2.1-style (text-to-video) pipelines built in code,
for tests and the offline quickstart.

No model hub is reachable offline, so these pipelines are built from a fixed seed, written with
`save_pretrained`, and then loaded back through the same `from_pretrained` path that hub ids take.
The tokenizers are real CLIP BPE tokenizers (built from the vocabulary that open-clip-torch ships), so
real English prompts tokenize as they would with the hub tokenizers. The T5 tokenizer of tiny-sd3 / tiny-flux (and
tiny-wan's UMT5) is a character-level Unigram model built in code (T5's own sentencepiece vocabulary is not shipped
offline).
"""
import gzip
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from .names import TINY_NAMES
# Bump when the architecture below changes, so stale caches are rebuilt rather than silently reused.
TINY_VERSION = "v3"
TINY_RESOLUTION = 64  # pixels; latents are 32x32 (the tiny VAE downsamples by 2)


def cache_root() -> Path:
    root = os.environ.get("DIFFUSION_ALIGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffusion-align")
    return Path(root)


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode():
    # GPT-2 / CLIP byte-level BPE alphabet: every byte maps to a printable unicode character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges():
    """The CLIP vocabulary (49408 tokens) and merges, rebuilt from open_clip's bpe_simple_vocab_16e6.txt.gz.

    Same construction as the original CLIP tokenizer, so ids match the hub's openai/clip-vit-* tokenizers.
    """
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [v + "</w>" for v in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def save_clip_tokenizer_files(folder, pad_token="<|endoftext|>"):
    """Write vocab.json / merges.txt and load them as a `CLIPTokenizer` (max length 77), saved in `folder`."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def build_clip_tokenizer(pad_token="<|endoftext|>"):
    """A real CLIP BPE tokenizer, built offline (no hub)."""
    with tempfile.TemporaryDirectory() as tmp:
        return save_clip_tokenizer_files(tmp, pad_token=pad_token)


# --------------------------------------------------------------------------- components
def _text_encoder(with_projection=False, hidden=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


# A random VAE decoder makes every image grey noise of the same mean (its GroupNorms remove any global
# shift of the latents), so no reward could move. The tiny VAE therefore ships pre-trained weights
# (`python -m utils.toy.tiny train-vae`, ~1 minute on a GPU): it encodes and decodes colours and shapes.
TINY_VAE_WEIGHTS = Path(__file__).parent / "assets" / "tiny_vae.safetensors"


def _vae(pretrained: bool = True):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=TINY_RESOLUTION,
    )
    if pretrained and TINY_VAE_WEIGHTS.exists():
        from safetensors import safe_open
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(TINY_VAE_WEIGHTS))
        with safe_open(TINY_VAE_WEIGHTS, "pt") as f:  # latents scaled to unit variance, as SD's 0.18215
            vae.register_to_config(scaling_factor=float(f.metadata()["scaling_factor"]))
    return vae


PALETTE = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.95, 0.9, 0.1),
           "purple": (0.55, 0.15, 0.7), "orange": (1.0, 0.55, 0.05), "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05)}


def procedural_images(n: int, generator: torch.Generator, size: int = TINY_RESOLUTION) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: a background colour with one or two rectangles / discs of palette
    colours. The training data of the tiny VAE."""
    palette = torch.tensor(list(PALETTE.values()))
    images = torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, size, size).clone()
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
            color = palette[torch.randint(len(palette), (1,), generator=generator)].view(3, 1, 1)
            color = (color + 0.1 * torch.randn(3, 1, 1, generator=generator)).clamp(0, 1)
            cy, cx = torch.randint(8, size - 8, (2,), generator=generator).tolist()
            ry, rx = torch.randint(4, size // 3, (2,), generator=generator).tolist()
            if torch.rand(1, generator=generator) < 0.5:
                mask = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
            else:
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            images[i] = torch.where(mask, color, images[i])
    return images


def train_tiny_vae(steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, device: str = "cpu", seed: int = 0,
                   sample_images=procedural_images, from_pretrained: bool = False):
    """Train the tiny VAE as an autoencoder (MSE + a small KL, as SD's VAE) on `sample_images(n, generator)`,
    (n, 3, 64, 64) in [0, 1]: procedural shapes by default (the toy world passes its own images).
    `from_pretrained`: start from the committed tiny VAE's weights (fine-tuning) instead of a random init."""
    torch.manual_seed(seed)
    vae = _vae(pretrained=from_pretrained).to(device).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        x = sample_images(batch_size, generator).to(device) * 2 - 1
        posterior = vae.encode(x).latent_dist
        loss = (vae.decode(posterior.sample()).sample - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.5f}", flush=True)
    vae.eval()
    with torch.no_grad():
        x = sample_images(256, torch.Generator().manual_seed(seed + 1)).to(device) * 2 - 1
        latents = vae.encode(x).latent_dist.mode()
        mse = (vae.decode(latents).sample - x).pow(2).mean().item()
    return vae.cpu(), 1.0 / latents.std().item(), mse


def _main():
    import argparse

    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="train and save the tiny VAE's weights")
    parser.add_argument("command", choices=["train-vae"])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(TINY_VAE_WEIGHTS))
    args = parser.parse_args()
    vae, scaling_factor, mse = train_tiny_vae(args.steps, args.batch_size, device=args.device, seed=args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, args.out, metadata={"scaling_factor": f"{scaling_factor:.6f}", "steps": str(args.steps),
                                         "seed": str(args.seed), "held_out_mse": f"{mse:.6f}"})
    print(f"saved {args.out}: scaling_factor {scaling_factor:.4f}, held-out reconstruction MSE {mse:.5f} (in [-1,1])")


if __name__ == "__main__":
    _main()


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    # The SD1.5 / SD 2.x / SDXL noise schedule, so the tiny models exercise the real timestep handling; SD 2.x's 768 px
    # models (stabilityai/stable-diffusion-2-1) predict v on it.
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type, timestep_spacing="leading",
    )


def _unet(sdxl: bool, sd2: bool = False):
    from diffusers import UNet2DConditionModel

    common = dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )
    if sd2:  # SD 2.x's layout: heads per block (its (5, 10, 20, 20)) and linear projections in the transformers
        return UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
                                    **common)
    if not sdxl:
        return UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=8, **common)
    # SDXL: text_time conditioning = pooled text embeds (32) + 6 time ids x 8 = 80 inputs.
    return UNet2DConditionModel(
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        **common,
    )


def build_tiny_pipeline(name: str, seed: int = 0):
    """Build the tiny pipeline `name` (one of TINY_NAMES) with weights drawn from `seed`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny pipeline {name!r}; expected one of {TINY_NAMES}")
    torch.manual_seed(seed)
    if name in ("tiny-sd3", "tiny-flux"):
        return _flow_pipeline(name)
    if name == "tiny-wan":
        return _wan_pipeline()
    if name == "tiny-sd2":
        return _sd2_pipeline()
    sdxl = name == "tiny-sdxl"
    unet, vae = _unet(sdxl), _vae()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_clip_tokenizer_files(Path(tmp) / "tok")
        tokenizer_2 = save_clip_tokenizer_files(Path(tmp) / "tok2", pad_token="!") if sdxl else None
    if sdxl:
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=_text_encoder(), text_encoder_2=_text_encoder(with_projection=True),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=_text_encoder(), tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sd2_pipeline():
    """SD 2.x's 768-v layout (stabilityai/stable-diffusion-2-1): a StableDiffusionPipeline whose UNet has heads per
    block and linear projections, whose text encoder is OpenCLIP-H as diffusers ships it (a CLIPTextModel with gelu
    activations, cut at the penultimate layer: its last hidden state is that layer's, after the final layer norm) with
    the OpenCLIP tokenizer's '!' padding, and whose scheduler predicts v."""
    from diffusers import StableDiffusionPipeline

    unet, vae = _unet(sdxl=False, sd2=True), _vae()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_clip_tokenizer_files(Path(tmp) / "tok", pad_token="!")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=_text_encoder(), tokenizer=tokenizer, unet=unet, scheduler=_scheduler("v_prediction"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- flow-matching (SD3, FLUX)
T5_WIDTH = 64  # d_model of the tiny T5 = the transformers' joint_attention_dim (4096 in SD3 and FLUX)


def build_t5_tokenizer():
    """A T5 tokenizer (Unigram, </s> appended, <pad> = 0 as T5's) over single characters: each character, with or
    without the word-start mark, is one piece, so any English prompt tokenizes without unknown tokens."""
    import string

    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in chars] + [(c, -2.0) for c in chars] + [("\u2581", -3.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _t5_encoder(umt5: bool = False):
    """A 2-layer T5 encoder (SD3, FLUX), or UMT5 (Wan: T5 with a relative position bias in every layer)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(vocab_size=len(build_t5_tokenizer()), d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=2,
                          num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                          is_encoder_decoder=False)
    return model_class(config)


def _flow_scheduler(name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if name == "tiny-sd3":  # SD3 / SD3.5's scheduler config: a fixed shift of 3
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    # FLUX.1-dev's: the shift follows the image's token count (256 -> 0.5, 4096 -> 1.15)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _flow_vae():
    """The tiny VAE (4 latent channels), with a shift_factor as SD3's and FLUX's VAEs have (0.0609, 0.1159): not 0, so
    that a decode that forgets it differs from the stock pipeline's."""
    vae = _vae()
    vae.register_to_config(shift_factor=0.1)
    return vae


def _flow_pipeline(name: str):
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = save_clip_tokenizer_files(Path(tmp) / "tok")
        tokenizer_2 = save_clip_tokenizer_files(Path(tmp) / "tok2", pad_token="!")
    t5_tokenizer = build_t5_tokenizer()
    if name == "tiny-sd3":
        # pooled projections: CLIP-L | CLIP-G projections (32 + 32); tokens: the two CLIPs' hidden states side by
        # side (32 + 32) zero-padded to T5's width, then T5's tokens
        transformer = SD3Transformer2DModel(
            sample_size=TINY_RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
            pooled_projection_dim=64, pos_embed_max_size=TINY_RESOLUTION // 4,
        )
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=_flow_scheduler(name), vae=_flow_vae(),
            text_encoder=_text_encoder(with_projection=True), tokenizer=tokenizer,
            text_encoder_2=_text_encoder(with_projection=True), tokenizer_2=tokenizer_2,
            text_encoder_3=_t5_encoder(), tokenizer_3=t5_tokenizer,
        )
    # FLUX.1-dev-like: 2x2-packed latents (4 channels x 4 = 16 per token), guidance embedding, one double-stream and one
    # single-stream block; rope axes sum to the head dim
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(
        transformer=transformer, scheduler=_flow_scheduler(name), vae=_flow_vae(),
        text_encoder=_text_encoder(), tokenizer=tokenizer, text_encoder_2=_t5_encoder(), tokenizer_2=t5_tokenizer,
    )


# --------------------------------------------------------------------------- video (Wan 2.1)
TINY_WAN_RESOLUTION = 32  # pixels; 4x4 latents (Wan's VAE downsamples by 8)
TINY_WAN_FRAMES = 5       # 2 latent frames: the first frame, then 4 frames in one


def _wan_pipeline():
    """Wan 2.1 T2V's layout (Wan-AI/Wan2.1-T2V-1.3B-Diffusers), tiny: a 2-layer WanTransformer3DModel (2 heads of 12,
    which its rotary embedding splits into 4 temporal and 4 + 4 spatial channels; 1x2x2 patches), an AutoencoderKLWan
    with Wan's compression (16 latent channels with Wan's per-channel latents_mean / latents_std; four levels: 8x
    spatial, time halved at the last two: 4x) on 3 base channels, a 2-layer UMT5 encoder over the character-level T5
    tokenizer, and Wan's scheduler config (UniPCMultistepScheduler, flow prediction, flow sigmas shifted by 3.0)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=T5_WIDTH, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=build_t5_tokenizer(), text_encoder=_t5_encoder(umt5=True), vae=vae,
                       scheduler=scheduler, transformer=transformer)


def tiny_pipeline_path(name: str) -> str:
    """Folder of the saved tiny pipeline `name`, building and saving it the first time.

    The build is written to a temporary folder and renamed into place, so concurrent callers (test workers,
    two accelerate processes) never see a half-written pipeline.
    """
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny pipeline {name!r}; expected one of {TINY_NAMES}")
    target = cache_root() / f"{name}-{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_pipeline(name).save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; theirs is identical (same seed)
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
