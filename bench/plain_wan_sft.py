"""The plain Wan 2.1 SFT loop as a script: bench/wan.py's baseline beside `train_dpo.py --sft`, launched the same way
(`accelerate launch --num_processes 1`) on the same pipeline folder and the same pre-encoded shard.

What a user writes from diffusers' documented pieces and the diffusers training examples' pattern, without this
project's run protocol: an Accelerator with bf16 mixed precision (fp32 weights under autocast), the transformer from
from_pretrained with diffusers' gradient checkpointing, AdamW, and per step: a latent sampled from the stored VAE
posterior (mean + std * noise), normalised by the VAE config's latents_mean / latents_std as WanPipeline does, t drawn
uniformly over the 1000 shifted training sigmas of a FlowMatchEulerDiscreteScheduler built from the pipeline
scheduler's flow_shift (launchers/sft_wan.sh's --weighting_scheme none), x_t = (1 - sigma) x_0 + sigma noise, the
velocity loss mse(v, noise - x_0), backward, gradient clipping, the optimizer step. Hyper-parameters default to
launchers/sft_wan.sh's (lr 5e-6, weight decay 0.01, betas 0.9 / 0.999, max_grad_norm 1.0 as train_dpo.py).

Each step appends a metrics.jsonl row (step, loss, step_seconds, peak_mem_gib) to --output_dir, the fields bench/wan.py
reads from the project's scripts, so that both kinds of run are timed the same way.

    accelerate launch --num_processes 1 bench/plain_wan_sft.py --pretrained_model_name_or_path /tmp/bench-models/wan \\
        --dataset_name /tmp/bench-wan/encoded-sft --output_dir /tmp/plain --max_train_steps 5 --gradient_checkpointing
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

MAX_SEQUENCE_LENGTH = 512  # WanPipeline pads UMT5 prompt embeddings to 512 tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="a saved WanPipeline folder")
    parser.add_argument("--dataset_name", required=True, help="a folder written by python -m utils.preencode")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_steps", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=5e-6)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=0.01)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def load_rows(folder):
    """Every row of the folder's first shard: [(latent mean, latent std, prompt embeddings)], each (1, C, f, h, w)
    float32 and (1, 512, D) zero-padded. A pairs folder gives its first video of each pair."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, "manifest.json")) as f:
        shard = load_file(os.path.join(folder, json.load(f)["shards"][0]["file"]))
    rows = []
    for i in range(len(shard["prompt_length"])):
        embeds = torch.zeros(1, MAX_SEQUENCE_LENGTH, shard["prompt_embeds"].shape[-1])
        length = int(shard["prompt_length"][i])
        embeds[0, :length] = shard["prompt_embeds"][i, :length].float()
        rows.append((shard["latents_0_mean"][i:i + 1].float(), shard["latents_0_std"][i:i + 1].float(), embeds))
    return rows


def main(argv=None):
    from accelerate import Accelerator
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    torch.manual_seed(args.seed)
    path = args.pretrained_model_name_or_path
    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer")
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    vae_config = AutoencoderKLWan.load_config(path, subfolder="vae")
    latents_mean = torch.tensor(vae_config["latents_mean"]).view(1, -1, 1, 1, 1)
    latents_std = torch.tensor(vae_config["latents_std"]).view(1, -1, 1, 1, 1)
    flow_shift = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler").get("flow_shift", 3.0)
    sigmas = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift).sigmas.float()  # (1000,)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    transformer.train()
    rows = load_rows(args.dataset_name)
    device = accelerator.device
    os.makedirs(args.output_dir, exist_ok=True)
    metrics = open(os.path.join(args.output_dir, "metrics.jsonl"), "w")
    progress = tqdm(range(args.max_train_steps), desc="plain Wan SFT")
    last = time.perf_counter()
    for step in progress:
        mean, std, embeds = (t.to(device) for t in rows[step % len(rows)])
        latents = mean + std * torch.randn_like(mean)                  # a sample of the VAE posterior
        x0 = (latents - latents_mean.to(device)) / latents_std.to(device)  # what WanPipeline's transformer sees
        noise = torch.randn_like(x0)
        sigma = sigmas[torch.randint(len(sigmas), (1,))].to(device)    # uniform over the shifted sigmas
        x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        with accelerator.autocast():
            v = transformer(x_t, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
        loss = F.mse_loss(v.float(), (noise - x0).float())
        accelerator.backward(loss)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().item()  # one host sync per step, as a loop that logs its loss
        now = time.perf_counter()
        row = dict(step=step + 1, loss=value, step_seconds=round(now - last, 3))
        if torch.cuda.is_available():
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        last = now
        progress.set_postfix(loss=value)
    metrics.close()


if __name__ == "__main__":
    main()
