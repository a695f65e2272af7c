"""Flow-matching models on one GPU (issue 18, item 5): DRaFT+ K = 1 LoRA steps, Diffusion-DPO LoRA pairs and online
RL (Flow-GRPO, DiffusionNFT) images per second and peak memory on SD3.5-Medium-size and FLUX.1-dev-size random-weight
pipelines, run end to end through the real scripts (`accelerate launch train_draftp.py / train_dpo.py /
train_online.py`), as bench/distributed.py runs SD1.5; online RL also beside the two third-party peers.

The architectures are the hub configs' (transformer, CLIP-L, CLIP-G, T5-XXL encoder, the 16-channel VAE), built with
random weights on the GPU and saved as the hub holds them, so that loading, memory and compute are those of the real
models. FLUX.1-dev (12 B parameters) runs with gradient checkpointing; the question the issue asks is whether it fits
one H200.

    python3 bench/flow.py --out $OUT --assets .bench_assets --family sd35     # SD3.5 Medium: build + 2 runs
    python3 bench/flow.py --out $OUT --assets .bench_assets --family flux     # FLUX.1-dev: build + 2 runs
    python3 bench/flow.py --out $OUT --assets .bench_assets --family sd35 --scripts flow_grpo nft   # online RL only
    python3 bench/flow.py --out $OUT --assets .bench_assets --family sd35 --steps 4 --timeout 130 --deadline 535 \
        --scripts flow_grpo nft flow_grpo_peer nft_peer                   # beside the peers (--peers .peers_online)
    python3 bench/flow.py --out /tmp/flow-smoke --smoke --family sd35         # here: tiny sizes on the CPU, 2 steps

--scripts picks the runs (default: draftp dpo); flow_grpo and nft run train_online.py with a weight-free reward
(brightness), one prompt's group of 8 images per step (group_size = train_batch_size = 8, no accumulation), so their
numbers are the model's sampling and training cost without a scorer's. The PickScore-size scorer (and the SD1.5
pipeline bench/distributed.py builds beside it) is built only when a draftp run is asked for.

Peers: flow_grpo_peer runs Flow-GRPO's scripts/train_sd3.py, nft_peer DiffusionNFT's scripts/train_nft_sd3.py,
unchanged, from copies of their repositories in --peers DIR (`flow_grpo/`, `diffusion_nft/` as ../shared/peers has
them, less NFT's 3 MB prompt lists; the GPU call carries the folder), each in its repository folder. Our matching
run's settings go in as ml_collections overrides on the command line (peer_flags): the same pipeline folder, one
prompt's group of G images per epoch (sample.train_batch_size = num_image_per_prompt = train.batch_size = G, one
batch, no accumulation: one optimizer step per epoch, as ours), sampling steps, guidance, resolution, noise level, KL
weight, timestep fraction, learning rate, bf16, no EMA, no evaluation or checkpoint after the start. LoRA: both peers
hard-code rank 32, alpha 64 on the attention projections, ours runs rank 32 with its default alpha 2 x rank = 64.
Reward: jpeg_compressibility, a weight-free reward in both peers' registries (selected with
`--config.reward_fn={'jpeg_compressibility': 1.0}`, no module of ours needed); like our brightness it costs a few ms
of CPU per group, so the rows compare sampling and training. Prompts: our `animals` set as `train.txt` / `test.txt`
in a folder, the layout of their `general_ocr` prompt function. Left as each project has it: the peers read T5 up to
128 tokens (ours: the stock pipeline's 256), train without gradient checkpointing (ours with) and keep the
transformer's weights in float32 under bf16 autocast; Flow-GRPO evaluates one test prompt before its first epoch
(its loop cannot skip epoch 0's; NFT's config.debug does), NFT samples with its dpm2 solver.

A peer runs as `python bench/flow.py --run_peer ...` (run_peer): the script through runpy in a process of its own,
with a `wandb` module of ours in sys.modules (they import wandb at the top; wandb.log with the losses is where each
optimizer step ends, so the stub writes a row per step to steps.jsonl: wall time, torch.cuda.max_memory_allocated,
loss, and ends the run after --steps steps, as Flow-GRPO's loop never ends). The process gets torchrun's variables
for one process (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*), as their one-GPU recipes start it (NFT: torchrun;
Flow-GRPO: accelerate launch with its multi_gpu.yaml, --num_processes 1). Runtime shims, in that process only,
where the current libraries or the CPU differ from what the peers were written for: Python 3.12 has no `imp`,
which their configs import (a module with imp.load_source goes in sys.modules); Flow-GRPO's KL term reads
`transformer.module`, which current accelerate gives only to 2+ processes (ddp_of_one wraps the trained model
in DDP over the group of one, the multi-process path); on a machine without CUDA (--smoke) NFT's hard-coded
CUDA (nccl, cuda:LOCAL_RANK, DDP's device_ids) maps to gloo and the CPU (cpu_shims). They need ml_collections and
absl-py (.whl/ holds the wheels for the GPU machine).

Writes OUT/flow.md and OUT/flow.json after every run (a call cut short keeps what it measured): exit status, wall
seconds, seconds from the launch to the first step's row (start-up plus the first step), s/step and images or pairs
per second over the steps after the first (each step from the end of the one before to its own end: our
metrics.jsonl's step_seconds, the differences of a peer's steps.jsonl times; so sampling, reward and training of
whole epochs), for a peer ours / peer in images/s, peak GiB (torch.cuda.max_memory_allocated), first loss, the first
row, and on a failure the log's last lines. A run stopped by --timeout (or --deadline, the call's whole budget) is
killed with its process group and still gives the rates of the steps it logged. OUT/flow_logs.tar.gz holds each
run's log and metrics.jsonl or steps.jsonl (one file: the device tool brings back at most 8), rewritten after every run
from the logs/ folder beside the runs.
"""
import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from distributed import build_pairs, last_error_line, read_metrics, run_logged, write_markdown  # noqa: E402

# --------------------------------------------------------------------------- architectures (the hub configs)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
VAE_16 = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SCALING = {"sd35": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}  # the VAEs' scaling_factor, shift_factor
# each run's flags beyond the shared ones: the SD3.5 launcher's sampling (launchers/draftp_sd35.sh), FluxPipeline's
# defaults (28 steps, guidance 3.5); DPO at 1024 px (the size both families were trained at), one pair per step.
# Online RL samples as Flow-GRPO's SD3.5-M recipe (10 steps, guidance 4.5; launchers/flow_grpo_sd35.sh) and NFT's
# (10 steps, guidance 1: no CFG; launchers/nft_sd35.sh), both at the family's resolution.
RUNS = {
    "sd35": dict(resolution=512, steps=10, guidance=4.5, dpo_resolution=1024, online_steps=10),
    "flux": dict(resolution=512, steps=28, guidance=3.5, dpo_resolution=1024, online_steps=10),
}
SCRIPTS = ["draftp", "dpo", "flow_grpo", "nft", "flow_grpo_peer", "nft_peer"]
ONLINE = {"flow_grpo": dict(guidance=None), "nft": dict(guidance=1.0)}  # None: the family's RUNS guidance
GROUP_SIZE = 8  # images per prompt; train_batch_size is the same, so one prompt's group per step
# peer run: (its repository's folder in --peers, script, config and recipe its overrides start from, our run it
# mirrors, whether it hard-codes CUDA rather than using accelerate's device)
PEERS = {
    "flow_grpo_peer": ("flow_grpo", "scripts/train_sd3.py", "config/grpo.py:compressibility", "flow_grpo", False),
    "nft_peer": ("diffusion_nft", "scripts/train_nft_sd3.py", "config/nft.py:sd3_pickscore", "nft", True),
}


def smoke_sizes():
    """Tiny stand-ins of the same classes (CPU): the code path, not the numbers."""
    small_clip = dict(CLIP_L, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32)
    return dict(
        clip_l=small_clip, clip_g=small_clip,
        t5=dict(T5_XXL, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4),
        vae=dict(VAE_16, block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32),
        sd35=dict(SD35_MEDIUM, sample_size=32, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                  joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
                  dual_attention_layers=(0,)),
        flux=dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    )


def build_pipeline(family, folder, assets, smoke):
    """A random-weight pipeline of the family, saved to `folder` through save_pretrained (skipped if it exists)."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    from utils.toy.tiny import build_clip_tokenizer, build_t5_tokenizer

    sizes = smoke_sizes() if smoke else dict(clip_l=CLIP_L, clip_g=CLIP_G, t5=T5_XXL, vae=VAE_16, sd35=SD35_MEDIUM,
                                             flux=FLUX_DEV)
    # the real CLIP BPE tokenizer where --write_assets saved it; T5's length is the pipelines' max_sequence_length
    # (256 / 512 tokens, padded), so a character-level T5 tokenizer costs the same compute as the real SentencePiece
    clip_tok = AutoTokenizer.from_pretrained(os.path.join(assets, "tokenizer")) if assets else build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    scaling, shift = SCALING[family]
    torch.manual_seed(0)
    device = "cpu" if smoke else "cuda"  # random init of 8-17 B parameters is many minutes on the CPU
    with torch.device(device):
        vae = AutoencoderKL(**sizes["vae"], scaling_factor=scaling, shift_factor=shift)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**sizes["clip_l"]))
        t5 = T5EncoderModel(T5Config(**sizes["t5"])).to(torch.bfloat16)  # T5-XXL is 19 GB in fp32
        if family == "sd35":
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**sizes["sd35"]), scheduler=scheduler, vae=vae,
                text_encoder=clip_l, tokenizer=clip_tok,
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**sizes["clip_g"])), tokenizer_2=clip_tok,
                text_encoder_3=t5, tokenizer_3=t5_tok)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                        base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                        max_image_seq_len=4096)
            transformer = FluxTransformer2DModel(**sizes["flux"]).to(torch.bfloat16)  # 12 B: 48 GB in fp32
            pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                text_encoder=CLIPTextModel(CLIPTextConfig(**sizes["clip_l"])), tokenizer=clip_tok,
                                text_encoder_2=t5, tokenizer_2=t5_tok)
        pipe.save_pretrained(folder)
    return folder


def build_scorer(folder, assets, smoke):
    """A PickScore-size CLIP scorer (bench/distributed.py's on the GPU; the tiny toyclip-free CLIP in smoke mode)."""
    if smoke:
        return None  # the smoke runs score with a weight-free reward
    from distributed import build_models

    build_models(assets, folder, sdxl=False)
    return os.path.join(folder, "pickscore")


def online_settings(family, script, smoke):
    """What an online run and its peer share: resolution, sampling steps, guidance, G (images per prompt and step)."""
    run = RUNS[family]
    return dict(resolution=64 if smoke else run["resolution"], steps=2 if smoke else run["online_steps"],
                guidance=ONLINE[script]["guidance"] or run["guidance"], group=2 if smoke else GROUP_SIZE)


def run_flags(family, script, model, scorer, data, smoke):
    run = RUNS[family]
    common = ["--pretrained_model_name_or_path", model, "--report_to", "none", "--seed", "0", "--use_lora",
              "--lora_rank", "32" if not smoke else "4", "--gradient_checkpointing", "--validation_steps", "1000",
              "--mixed_precision", "no" if smoke else "bf16", "--overwrite_output_dir"]
    if script in ONLINE:
        online = online_settings(family, script, smoke)
        group = str(online["group"])
        return ["train_online.py", *common, "--method", script, "--reward_model", "brightness", "--prompts", "animals",
                "--resolution", str(online["resolution"]), "--num_inference_steps", str(online["steps"]),
                "--guidance_scale", str(online["guidance"]), "--group_size", group, "--train_batch_size", group,
                "--gradient_accumulation_steps", "1", "--learning_rate", "3e-4", "--num_validation_images", "1"]
    if script == "draftp":
        reward = (["--reward_model", "pickscore", "--reward_model_paths", f"pickscore={scorer}"] if scorer
                  else ["--reward_model", "saturation"])
        return ["train_draftp.py", *common, *reward, "--prompts", "animals", "--train_batch_size", "1" if not smoke else "2",
                "--resolution", str(64 if smoke else run["resolution"]), "--num_inference_steps",
                str(2 if smoke else run["steps"]), "--guidance_scale", str(run["guidance"]), "--kl_coeff", "0.1",
                "--truncation_steps", "1", "--learning_rate", "1e-4", "--compile_sampler", "off"]
    return ["train_dpo.py", *common, "--dataset_name", data, "--resolution", str(64 if smoke else run["dpo_resolution"]),
            "--train_batch_size", "1", "--learning_rate", "1e-5", "--lr_warmup_steps", "0",
            "--num_inference_steps", "2" if smoke else "10"]


def peer_flags(family, name, model, prompts, out, smoke):
    """The peer's config and its overrides: our matching run's settings (run_flags and train_online.py's
    METHOD_DEFAULTS) in the peer's terms."""
    _, _, config, ours, _ = PEERS[name]
    online = online_settings(family, ours, smoke)
    group = online["group"]
    settings = {
        "pretrained.model": model, "dataset": prompts, "prompt_fn": "general_ocr", "resolution": online["resolution"],
        "mixed_precision": "no" if smoke else "bf16", "seed": 0, "use_lora": True,
        "reward_fn": {"jpeg_compressibility": 1.0}, "per_prompt_stat_tracking": True,
        "sample.num_steps": online["steps"], "sample.eval_num_steps": online["steps"],
        "sample.guidance_scale": float(online["guidance"]), "sample.train_batch_size": group,
        "sample.num_image_per_prompt": group, "sample.num_batches_per_epoch": 1, "sample.test_batch_size": 1,
        "sample.global_std": True, "train.batch_size": group, "train.gradient_accumulation_steps": 1,
        "train.num_inner_epochs": 1, "train.learning_rate": 3e-4, "train.timestep_fraction": 0.99,
        "train.adv_clip_max": 5, "train.ema": False,
        "eval_freq": 10**6, "save_freq": 10**6, "run_name": name, "logdir": os.path.join(out, "logs"), "save_dir": out,
    }
    if ours == "flow_grpo":
        settings.update({"sample.noise_level": 0.7, "train.beta": 0.04, "train.clip_range": 1e-4, "train.cfg": True})
    else:  # NFT: deterministic sampling (noise level 0), nft beta 1, decay schedule 1, KL weight 1e-4
        settings.update({"sample.deterministic": True, "beta": 1.0, "decay_type": 1, "train.beta": 1e-4,
                         "debug": True})  # debug: no evaluation and no checkpoint at epoch 0
    return [f"--config={config}", *(f"--config.{key}={value}" for key, value in settings.items())]


def write_peer_prompts(folder):
    """Our `animals` prompt set in the layout of the peers' `general_ocr` prompt function: train.txt, test.txt."""
    from utils.data import BUILTIN_PROMPT_SETS

    os.makedirs(folder, exist_ok=True)
    prompts = BUILTIN_PROMPT_SETS["animals"]
    for split, lines in (("train", prompts), ("test", prompts[:1])):  # Flow-GRPO evaluates the test set once
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return os.path.abspath(folder)


def first_row_watcher(metrics_path, started):
    """A thread that notes the seconds from `started` until metrics_path holds its first row (polled every 0.2 s);
    returns (stop event, result dict with "first_step_s" once seen)."""
    stop, result = threading.Event(), {}

    def watch():
        while not stop.is_set():
            if os.path.exists(metrics_path) and os.path.getsize(metrics_path) > 0:
                result["first_step_s"] = round(time.time() - started, 1)
                return
            stop.wait(0.2)

    threading.Thread(target=watch, daemon=True).start()
    return stop, result


def log_tail(log_path, lines=40):
    with open(log_path) as f:
        return f.read().splitlines()[-lines:]


def summarize(row, steps, items, log, code):
    """A row's rates from its logged steps (each with step_seconds): the mean over the steps after the first, i.e.
    items over the wall time from the end of step 1 to the end of the last step; kept when the run was cut short."""
    row["steps_logged"] = len(steps)
    if steps:
        window = steps[1:] or steps
        seconds = sum(m["step_seconds"] for m in window) / len(window)
        row.update(s_per_step=round(seconds, 3), per_s=round(items / seconds, 3), first_loss=steps[0].get("loss"),
                   first_metrics=steps[0])
        peaks = [m["peak_mem_gib"] for m in steps if "peak_mem_gib" in m]  # none on the CPU
        if peaks:
            row["peak_gib"] = max(peaks)
    if code == 0 and steps:
        return {**row, "status": "ok"}
    if code == 124 and steps:
        return {**row, "status": f"timed out after {len(steps)} steps", "log_tail": log_tail(log)}
    return {**row, "status": last_error_line(log), "log_tail": log_tail(log)}


def measure(family, script, flags, work, logs, steps, timeout=540):
    name = f"{family}-{script}"
    out = os.path.join(work, name)
    log = os.path.join(logs, name + ".log")
    shutil.rmtree(out, ignore_errors=True)  # a first row left by an earlier call would end the watcher at once
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "launchers", "accelerate", "single_gpu.yaml"), "--num_processes", "1",
           "--main_process_port", str(29500 + zlib.crc32(out.encode()) % 1000), *flags, "--output_dir", out,
           "--max_train_steps", str(steps), "--checkpointing_steps", "1000"]
    stop, seen = first_row_watcher(os.path.join(out, "metrics.jsonl"), time.time())
    code, wall = run_logged(cmd, log, timeout)
    stop.set()
    metrics = read_metrics(out)
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        shutil.copy(os.path.join(out, "metrics.jsonl"), os.path.join(logs, name + ".metrics.jsonl"))
    per_step = 1 if script == "dpo" else int(flags[flags.index("--train_batch_size") + 1])
    row = dict(family=family, script=script, exit_code=code, wall_s=round(wall, 1),
               first_step_s=seen.get("first_step_s"), unit="pairs/s" if script == "dpo" else "images/s")
    return summarize(row, metrics, per_step, log, code)


def measure_peer(family, name, model, prompts, peers, work, logs, steps, timeout, smoke):
    """One peer run (run_peer in a process of its own, in the peer's repository folder) for `steps` optimizer steps."""
    repo, script, _, ours, cuda_only = PEERS[name]
    repo = os.path.abspath(os.path.join(peers, repo))
    label = f"{family}-{name}"
    out = os.path.join(work, label)
    log = os.path.join(logs, label + ".log")
    record = os.path.join(out, "steps.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    flags = peer_flags(family, name, model, prompts, out, smoke)
    # one process as their one-GPU recipes start it (torchrun / accelerate launch --num_processes 1 with their
    # multi_gpu.yaml): these variables make a process group of one and DDP around the transformer, whose `.module`
    # Flow-GRPO's KL term reads
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + zlib.crc32(out.encode()) % 1000))
    shims = ",".join(["cpu_shims"] if cuda_only and smoke else [] if cuda_only else ["ddp_of_one"]) or "-"
    cmd = [sys.executable, os.path.abspath(__file__), "--run_peer", record, str(steps), shims, script, *flags]
    started = time.time()
    stop, seen = first_row_watcher(record, started)
    code, wall = run_logged(cmd, log, timeout, cwd=repo, env=env)
    stop.set()
    rows = []
    if os.path.exists(record):
        with open(record) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        shutil.copy(record, os.path.join(logs, label + ".steps.jsonl"))
    previous = started  # a step runs from the end of the one before (the first: from the launch)
    for r in rows:
        r["step_seconds"], previous = round(r["time"] - previous, 3), r["time"]
    row = dict(family=family, script=name, exit_code=code, wall_s=round(wall, 1),
               first_step_s=seen.get("first_step_s"), unit="images/s", mirrors=ours,
               command=" ".join(["python", script, *flags]))
    return summarize(row, rows, online_settings(family, ours, smoke)["group"], log, code)


def add_ratios(rows):
    """ours / peer in images/s on each peer row whose matching run of ours (same family) has a rate."""
    for peer in rows:
        ours = next((r for r in rows if peer.get("mirrors") and r["script"] == peer["mirrors"]
                     and r["family"] == peer["family"] and r.get("per_s")), None)
        if ours and peer.get("per_s"):
            peer["ours_over_peer"] = round(ours["per_s"] / peer["per_s"], 3)


def write_table(rows, out):
    with open(os.path.join(out, "flow.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| model | script | result | exit | s/step | throughput | ours / peer | peak GiB | first step s | "
             "wall s | first loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rate = f"{r['per_s']} {r['unit']}" if "per_s" in r else "-"
        lines.append(f"| {r['family']} | {r['script']} | {r['status']} | {r.get('exit_code', '-')} | "
                     f"{r.get('s_per_step', '-')} | {rate} | {r.get('ours_over_peer', '-')} | "
                     f"{r.get('peak_gib', '-')} | "
                     f"{r.get('first_step_s') or '-'} | {r.get('wall_s', '-')} | {r.get('first_loss', '-')} |")
    write_markdown(out, "flow.md", lines)


# --------------------------------------------------------------------------- inside a peer's process
class PeerDone(Exception):
    """Raised from the wandb stub once the peer has made the steps asked for."""


def cpu_shims():
    """Without CUDA (--smoke), for DiffusionNFT only (Flow-GRPO's accelerate runs on the CPU as it is, and needs the
    real torch.device): its hard-coded CUDA mapped to the CPU in this process. nccl becomes gloo,
    torch.device("cuda:N") the CPU, torch.cuda.set_device a no-op, DDP is built without device_ids."""
    import torch
    import torch.distributed as dist
    import torch.nn.parallel

    real_device, real_init, real_ddp = torch.device, dist.init_process_group, torch.nn.parallel.DistributedDataParallel

    class DeviceType(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, real_device)

    class Device(metaclass=DeviceType):  # torch.device cannot be subclassed: a factory that isinstance() accepts
        def __new__(cls, *args, **kwargs):
            kind = args[0] if args else kwargs.get("type")
            if isinstance(kind, str) and kind.startswith("cuda"):
                return real_device("cpu")
            return real_device(*args, **kwargs)

    class CpuDDP(real_ddp):
        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            super().__init__(module, **kwargs)

    torch.device = Device
    torch.cuda.set_device = lambda *args, **kwargs: None
    dist.init_process_group = lambda backend=None, **kwargs: real_init("gloo", **kwargs)
    torch.nn.parallel.DistributedDataParallel = CpuDDP


def ddp_of_one():
    """Flow-GRPO's KL term reads `transformer.module`, the DDP wrapper's: its recipes run accelerate's multi_gpu.yaml,
    and current accelerate wraps the model in DDP only for 2 processes or more. With one, prepare() here wraps the
    trained model in DDP over a process group of one, as the multi-process path does."""
    import accelerate
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    real = accelerate.Accelerator.prepare_model

    def prepare_model(self, model, device_placement=None, evaluation_mode=False):
        model = real(self, model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        if evaluation_mode or isinstance(model, DistributedDataParallel) or \
                not any(p.requires_grad for p in model.parameters()):
            return model
        if not dist.is_initialized():  # accelerate makes the group on the GPU (LOCAL_RANK set), not on the CPU
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        wrapped = DistributedDataParallel(model, device_ids=[self.local_process_index] if torch.cuda.is_available()
                                          else None)
        self._models[self._models.index(model)] = wrapped
        return wrapped

    accelerate.Accelerator.prepare_model = prepare_model


def run_peer(argv):
    """`--run_peer STEPS_JSONL MAX_STEPS SHIMS SCRIPT ARGS...`: the peer's script, unchanged, in this process
    (runpy), as `python SCRIPT ARGS...` would run it, with a wandb stub that writes a row per optimizer step to
    STEPS_JSONL and ends the run after MAX_STEPS of them. SHIMS: "-", or a comma-separated list of cpu_shims and
    ddp_of_one."""
    import runpy
    import types

    import torch

    record, max_steps, shims, script, *script_args = argv
    cuda = torch.cuda.is_available()
    done = []

    def log(data, step=None, **kwargs):
        if "policy_loss" not in data:  # both peers log the losses once per optimizer step, at its end
            return
        if cuda:
            torch.cuda.synchronize()  # the step's GPU work done, not only queued
        done.append(time.time())
        loss = data.get("loss", data.get("total_loss"))
        row = dict(step=len(done), time=done[-1])
        if loss is not None:
            row["loss"] = float(torch.as_tensor(loss).detach())
        if cuda:  # this process's peak since its start, as our metrics.jsonl's peak_mem_gib
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        with open(record, "a") as f:
            f.write(json.dumps(row) + "\n")
        if len(done) >= int(max_steps):
            raise PeerDone

    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # importlib.util.find_spec("wandb") asks for it
    wandb.init = wandb.finish = lambda *args, **kwargs: None
    wandb.Image = lambda *args, **kwargs: None
    wandb.log = log
    sys.modules["wandb"] = wandb
    if importlib.util.find_spec("imp") is None:  # Python 3.12 dropped imp; the peers' configs call imp.load_source

        def load_source(name, path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module

        sys.modules["imp"] = types.SimpleNamespace(load_source=load_source)
    if "cpu_shims" in shims.split(",") and not cuda:
        cpu_shims()
    if "ddp_of_one" in shims.split(","):
        ddp_of_one()
    # what `python SCRIPT` sees: the script's folder first, not this project's
    sys.path[:] = [os.path.dirname(os.path.abspath(script))] + [p for p in sys.path[1:] if p not in (HERE, ROOT)]
    sys.argv = [script, *script_args]
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except PeerDone:
        pass
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no waiting for the peer's data-loader workers, thread pool and process group at exit


# --------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--assets", default=None, help="folder of `bench/distributed.py --write_assets` (GPU runs)")
    parser.add_argument("--models", default="/tmp/bench-models")
    parser.add_argument("--family", nargs="*", default=["sd35", "flux"], choices=list(RUNS))
    parser.add_argument("--scripts", nargs="*", default=["draftp", "dpo"], choices=SCRIPTS,
                        help="the runs, in this order: draftp (train_draftp.py), dpo (train_dpo.py), flow_grpo and "
                             "nft (train_online.py --method flow_grpo / nft), flow_grpo_peer and nft_peer (Flow-GRPO's "
                             "train_sd3.py, DiffusionNFT's train_nft_sd3.py from --peers, sd35 only)")
    parser.add_argument("--peers", default=".peers_online",
                        help="folder holding copies of the peer repositories: flow_grpo/ (Flow-GRPO) and "
                             "diffusion_nft/ (DiffusionNFT), as in ../shared/peers")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of each run (peers: epochs)")
    parser.add_argument("--timeout", type=int, default=540, help="seconds each run may take before it is stopped")
    parser.add_argument("--deadline", type=int, default=None,
                        help="seconds for the whole call from its start: a run gets at most what is left (less 10 s "
                             "for the tables), so that the last one still ends and writes its partial rates")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, 2 steps: the code path runs")
    args = parser.parse_args()
    started_call = time.time()
    if not args.smoke and not args.assets:
        parser.error("--assets is required on the GPU (run `bench/distributed.py --write_assets` here first)")
    wanted_peers = [s for s in args.scripts if s in PEERS]
    if wanted_peers and args.family != ["sd35"]:
        parser.error("the peers train SD3 only: use --family sd35 with flow_grpo_peer / nft_peer")
    for name in wanted_peers:
        repo, script = PEERS[name][:2]
        if not os.path.isfile(os.path.join(args.peers, repo, script)):
            parser.error(f"--peers {args.peers} lacks {repo}/{script}: copy ../shared/peers/{repo} to "
                         f"{os.path.join(args.peers, repo)} (and carry the folder to the GPU machine)")
    if wanted_peers and not all(importlib.util.find_spec(m) for m in ("ml_collections", "absl")):
        parser.error("the peers need ml_collections and absl-py (wheels in .whl/)")
    work = os.path.join(args.out, "runs") if args.smoke else "/tmp/bench-runs"
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    steps = 2 if args.smoke else args.steps
    scorer = None
    rows = []
    for family in args.family:
        started = time.time()
        model = build_pipeline(family, os.path.join(args.models, family + ("-smoke" if args.smoke else "")),
                               args.assets, args.smoke)
        print(f"{family} pipeline ready in {time.time() - started:.1f} s", flush=True)
        for script in args.scripts:
            timeout = args.timeout
            if args.deadline is not None:
                timeout = min(timeout, int(args.deadline - (time.time() - started_call) - 10))
                if timeout < 20:
                    rows.append(dict(family=family, script=script,
                                     status=f"not run: --deadline {args.deadline} s reached"))
                    write_table(rows, args.out)
                    continue
            if script in PEERS:
                prompts = write_peer_prompts(os.path.join(work, "peer-prompts"))
                rows.append(measure_peer(family, script, model, prompts, args.peers, work, logs, steps, timeout,
                                         args.smoke))
            else:
                if script == "draftp" and scorer is None and not args.smoke:  # only DRaFT+ scores with a model
                    started = time.time()
                    scorer = build_scorer(args.models, args.assets, args.smoke)
                    print(f"scorer ready in {time.time() - started:.1f} s", flush=True)
                size = 64 if args.smoke else RUNS[family]["dpo_resolution"]
                data = build_pairs(f"/tmp/bench-data/pairs{size}", size) if script == "dpo" else None
                flags = run_flags(family, script, model, scorer, data, args.smoke)
                rows.append(measure(family, script, flags, work, logs, steps, timeout))
            add_ratios(rows)
            write_table(rows, args.out)
            shutil.make_archive(os.path.join(args.out, "flow_logs"), "gztar", logs)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run_peer"]:
        run_peer(sys.argv[2:])
    else:
        main()
