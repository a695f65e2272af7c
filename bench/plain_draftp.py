"""The plain DRaFT+ loop as a script: bench/e2e.py's baseline beside train_draftp.py, run the same way (a subprocess
whose tqdm "k/N" lines the harness times).

What a user writes from diffusers' documented pieces, without this project's speed options: the pipeline's parts
loaded with from_pretrained, peft LoRA on the UNet's attention projections (adapters in fp32 under autocast, as
train_draftp.py keeps them), and each step bench.py's plain_draftp_step (the pipeline __call__ loop with DRaFT+ at
the last K steps, the reference by switching the adapters off: eager, NCHW, no checkpointing, no compile). The
model, reward, batch, resolution, DDIM steps, CFG, kl_coeff and LoRA rank are those of e2e.py's train_draftp.py row. Prompts are
random token ids, as in bench.py (the text encoder's cost is in both; the reward sees one fixed caption).

    python bench/plain_draftp.py --pretrained_model_name_or_path /tmp/bench-models/sd15 --reward_model pickscore \\
        --reward_model_paths pickscore=/tmp/bench-models/pickscore --train_batch_size 4 --max_train_steps 25
"""
import argparse
import os
import sys
import types

import torch
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench  # noqa: E402  (bench/bench.py: the plain loop's step)
from utils.models import TextConditioning, add_trainable_lora  # noqa: E402
from utils.rewards import load_reward  # noqa: E402
from utils.train.cli import parse_name_paths  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--reward_model", default="pickscore")
    parser.add_argument("--reward_model_paths", nargs="*", default=[], help="NAME=FOLDER, as train_draftp.py")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--num_inference_steps", type=int, default=bench.STEPS)
    parser.add_argument("--truncation_steps", type=int, default=1)
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load(args):
    """A namespace with what bench.plain_draftp_step reads (bench.Setup's fields), from the saved pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    path = args.pretrained_model_name_or_path
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device, dtype).requires_grad_(False).eval()
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device, dtype).requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    add_trainable_lora(unet, bench.LORA_RANK, None, args.seed, device, dtype)
    latent_hw = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    scorer = load_reward(args.reward_model, device=device, dtype=dtype, paths=parse_name_paths(args.reward_model_paths))

    @torch.no_grad()
    def text(batch, seed=1):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, tokenizer.vocab_size, (batch, tokenizer.model_max_length), generator=g)
        return TextConditioning(text_encoder(ids.to(device))[0])

    def noise(batch, seed=2):
        return torch.randn(batch, 4, latent_hw, latent_hw, generator=torch.Generator().manual_seed(seed)).to(device)

    lora = [p for p in unet.parameters() if p.requires_grad]
    return types.SimpleNamespace(
        unet=unet, vae=vae, scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"), scorer=scorer,
        optimizer=torch.optim.AdamW(lora, lr=1e-5), text=text, noise=noise, sdxl=False, device=device, dtype=dtype,
        autocast=torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32))


def main(argv=None):
    args = parse_args(argv)
    bench.STEPS = args.num_inference_steps  # plain_draftp_step's DDIM steps
    S = load(args)
    progress = tqdm(range(args.max_train_steps), desc="plain DRaFT+")
    for _ in progress:
        loss, _ = bench.plain_draftp_step(S, args.train_batch_size, args.truncation_steps)
        progress.set_postfix(loss=float(loss))  # one host sync per step, as a user's loop logging its loss


if __name__ == "__main__":
    main()
