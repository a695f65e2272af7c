"""Wan 2.1 text-to-video on one GPU (issue 37, item 6): SFT, DRaFT+ and DPO steps per second and peak memory on a
Wan 2.1 T2V 1.3B-size random-weight pipeline, measured as users run them: the real scripts end to end as subprocesses
(`python -m utils.preencode`, `accelerate launch train_dpo.py / train_draftp.py`), beside a plain diffusers-style SFT
loop (bench/plain_wan_sft.py) in the same call.

    python3 bench/wan.py --out $OUT/w --sections sft plain dpo draftp --deadline 470     # the GPU call (~8 min)
    python3 bench/wan.py --out $OUT/w --sections draftp --deadline 470 --draftp_flags "--compile_sampler off"
    python3 bench/wan.py --out /tmp/wan-tiny --tiny                                      # here: tiny-wan on the CPU

The first line is the whole benchmark in one call on one H100 or H200 (diffusers and datasets from .whl on PYTHONPATH,
.bench_assets carried); the second measures DRaFT+ alone without the sampler's compilation. draftp goes last in the
GPU call: it is the longest run (it loads the 5.7 B text encoder, and its default --compile_sampler auto compiles the
sampling transformer with CUDA graphs during the warm-up step), so a call that meets its --deadline there has every
other row. draftp needs .bench_assets (bench/distributed.py --write_assets: the CLIP tokenizer and processor of the
PickScore-size scorer). Videos are written and read with PyAV where
it is installed; where it is not (the GPU machine: its 37 MB wheel does not fit the device tool's 64 MiB working tree
beside the checkout, .whl and .bench_assets), they are written with OpenCV's MPEG-4 writer and the pre-encoder reads
them through bench/opencv_av, a stand-in for the three PyAV calls it makes. Only the set-up reads videos.

Models (built once on the GPU with random weights, saved with save_pretrained into --models, reused by every
section and by later calls on the same machine, and loaded by the scripts through their normal
--pretrained_model_name_or_path): WanTransformer3DModel with the 1.3B config (30 layers, 12 heads of 128, ffn 8960,
text_dim 4096, patch (1, 2, 2), freq_dim 256, cross-attention norm, qk_norm rms_norm_across_heads, eps 1e-6,
rope_max_seq_len 1024), saved in float32 as the hub holds it; AutoencoderKLWan with its default config (Wan 2.1's
VAE); a UMT5-XXL encoder (d_model 4096, d_kv 64, 64 heads, d_ff 10240, vocab 256384; 24 layers, 5.7 B parameters,
--text_layers fewer to save its save and load time), in bf16 as the hub holds it; Wan's scheduler config
(UniPCMultistepScheduler, flow prediction, flow_shift 3.0). The tokenizer is utils/toy/tiny.py's character-level T5
tokenizer, not UMT5's SentencePiece vocabulary: prompts are padded to WanPipeline's 512 tokens either way, so the
encoder's compute is the real one. SFT and DPO read only pre-encoded embeddings (no text encoder in those runs); the
DRaFT+ run loads and runs the encoder. The scorer of DRaFT+ is a PickScore-size CLIP (ViT-H-14; bench/bench.py's
PICKSCORE config) saved as a local folder and passed with --reward_model_paths.

Data: three 81-frame 480 x 832 mp4 clips (smooth moving colour ramps) and two preference pairs of them, encoded by
`python -m utils.preencode --pairs` with that pipeline's VAE and text encoder. sft and plain train on the same folder
(train_dpo.py --sft reads each pair's preferred video, the plain loop the first video of each pair: the same latent
and embedding shapes), so the call pre-encodes once and loads the text encoder once for it; --sft_data captions
encodes the clips with their captions into a folder of their own instead, as users' SFT data is.

Sections (--sections, in the order given), each run with its own --timeout and the whole call within --deadline:
- sft: `train_dpo.py --sft` full fine-tune at 480 x 832 x 81 frames (latents 16 x 21 x 60 x 104) with the flags of
  launchers/sft_wan.sh (AdamW lr 5e-6, weight decay 0.01, t uniform on the shift-3 sigmas, bf16, gradient
  checkpointing), batch 1: once with launchers/accelerate/single_gpu.yaml and once with fsdp.yaml (FSDP2 over one
  process, its wrap class set to WanTransformerBlock on the launch line as README's FSDP note says); the strategy
  the run reports is in the table.
- plain: bench/plain_wan_sft.py, the same step as a plain loop on the same folder, launched the same way; the table
  gives ours / plain in s/step (below 1: ours is faster).
- draftp: `train_draftp.py` as launchers/draftp_wan.sh (DRaFT+ K = 1, kl 0.2, LoRA rank 32 alpha 64, 20 Euler steps,
  CFG 5, PickScore on 4 frames), at 33 frames 480 x 480 (the script samples square videos), batch 1 and no
  accumulation (the launcher's 4 micro-steps per update would make a step 4 videos).
- dpo: `train_dpo.py` Diffusion-DPO, LoRA rank 8, on the pairs folder at 480 x 832 x --dpo_frames (81), batch 1 pair.

Each run makes --steps W T steps (section defaults in STEPS): s/step is the median of metrics.jsonl's step_seconds over
the T steps after the W warm-up steps, and, as a check, the wall clock: the harness stamps each metrics.jsonl row as it
appears, and takes (stamp of the last row - stamp of row W) / T. Peak memory: torch's max_memory_allocated as the runs
log it, and nvidia-smi sampled every 0.2 s (less what was in use before the run). OUT/wan.json and OUT/wan.md are
rewritten after every run, so a call cut short (--timeout per run, --deadline for the whole) keeps what finished, and
the rates of a run stopped part way come from the steps it logged. OUT holds no folders, and all run logs in one file,
OUT/wan_logs.txt: the device tool brings back at most 8 files.

--tiny runs every section end to end on the CPU with tiny-wan (utils/toy/tiny.py) at 32 px and 5 frames, a
weight-free reward (color_match) for DRaFT+, float32 and 1 + 2 steps per run: the harness and the scripts' paths, not
the numbers (on the CPU accelerate runs fsdp.yaml as one plain process; the strategy column says so).
"""
import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # bench/distributed.py and bench/e2e.py: the subprocess runner, readers and memory sampler
sys.path.insert(0, ROOT)

from distributed import last_error_line, read_metrics, run_logged, write_assets, write_markdown  # noqa: E402
from e2e import MemorySampler  # noqa: E402

# --------------------------------------------------------------------------- architectures (the hub configs)
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN_T2V_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# its text_encoder/config.json (google/umt5-xxl's encoder)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                dense_act_fn="gelu_new", tie_word_embeddings=False, is_encoder_decoder=False)
FLOW_SHIFT = 3.0  # its scheduler config at 480p

SECTIONS = ["sft", "plain", "dpo", "draftp"]
# (warm-up steps, timed steps) of each section's runs
STEPS = {"sft": (2, 3), "plain": (2, 3), "draftp": (1, 2), "dpo": (2, 3)}
SIZES = {
    "full": dict(height=480, width=832, frames=81, draftp_resolution=480, draftp_frames=33, inference_steps=20,
                 clips=3, precision="bf16", dtype="bfloat16"),
    "tiny": dict(height=32, width=32, frames=5, draftp_resolution=32, draftp_frames=5, inference_steps=2,
                 clips=3, precision="no", dtype="float32"),
}
STARTED = time.time()
HAVE_AV = importlib.util.find_spec("av") is not None  # else bench/opencv_av stands in (its docstring says why)


def say(message):
    """A progress line with the clock and the seconds since the call started (unbuffered)."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - STARTED:.0f}s] {message}", flush=True)


# --------------------------------------------------------------------------- models (a subprocess of their own)
def build_main(argv):
    """`--build FOLDER TEXT_LAYERS [SCORER_FOLDER ASSETS]`: the random-weight pipeline (and the scorer) on the GPU,
    saved with save_pretrained. Run as a subprocess, so the harness holds no GPU memory during the timed runs."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from utils.toy.tiny import build_t5_tokenizer

    folder, text_layers, *scorer = argv
    torch.manual_seed(0)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        started = time.time()
        with torch.device("cuda"):  # random init of 7 B parameters takes minutes on the CPU
            transformer = WanTransformer3DModel(**WAN_T2V_13B)
            text_encoder = UMT5EncoderModel(UMT5Config(**dict(UMT5_XXL, num_layers=int(text_layers))))
            text_encoder.to(torch.bfloat16)  # the hub's dtype (11 GB); the scripts load it in fp32 and cast
            pipe = WanPipeline(tokenizer=build_t5_tokenizer(), text_encoder=text_encoder, vae=AutoencoderKLWan(),
                               transformer=transformer,
                               scheduler=UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                                                 use_flow_sigmas=True, flow_shift=FLOW_SHIFT))
        print(f"built in {time.time() - started:.1f} s: transformer "
              f"{sum(p.numel() for p in transformer.parameters()) / 1e9:.2f} B, text encoder "
              f"{sum(p.numel() for p in text_encoder.parameters()) / 1e9:.2f} B ({text_layers} layers)", flush=True)
        started = time.time()
        save_whole(pipe.save_pretrained, folder)
        print(f"saved in {time.time() - started:.1f} s", flush=True)
    if scorer and not os.path.isfile(os.path.join(scorer[0], "config.json")):
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor

        from bench import PICKSCORE

        with torch.device("cuda"):
            model = CLIPModel(CLIPConfig(**PICKSCORE))
        processor = CLIPProcessor.from_pretrained(os.path.join(scorer[1], "processor"))

        def save(tmp):
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)

        save_whole(save, scorer[0])
        print("PickScore-size scorer saved", flush=True)


def save_whole(save, folder):
    """`save(tmp)` into a temporary folder renamed to `folder` when done: a build cut off by its timeout leaves no
    folder that a later call would take for a finished one."""
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# --------------------------------------------------------------------------- data
def write_videos(folder, count, frames, height, width):
    """`count` mp4 clips of smooth colour ramps moving across the frame (cheap to encode at any size), captions.jsonl
    and pairs.jsonl (clip k against clip k + 1, the first preferred in even rows); skipped if written."""
    import numpy as np

    if os.path.isfile(os.path.join(folder, "pairs.jsonl")):
        return folder
    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    for k in range(count):
        clip = np.empty((frames, height, width, 3), np.uint8)
        for t in range(frames):
            phase = 2 * np.pi * (x / width + t / frames)
            clip[t, ..., 0] = 127 + 100 * np.sin(phase + k)
            clip[t, ..., 1] = 127 + 100 * np.cos(2 * np.pi * y / height + t / 8)
            clip[t, ..., 2] = (40 * k + 2 * t) % 256
        write_clip(os.path.join(folder, f"clip{k}.mp4"), clip)
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps({"file": f"clip{k}.mp4", "caption": f"a colour ramp moving right, clip {k}"}) + "\n"
                     for k in range(count))
    with open(os.path.join(folder, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps({"video_0": f"clip{k}.mp4", "video_1": f"clip{(k + 1) % count}.mp4",
                                 "label_0": float(k % 2 == 0), "caption": f"a colour ramp, pair {k}"}) + "\n"
                     for k in range(2))
    return folder


def write_clip(path, frames):
    """uint8 (F, H, W, 3) frames as an mp4: H.264 through PyAV (utils.toy.video_world.write_mp4), or MPEG-4 through
    OpenCV where PyAV is missing (bench/opencv_av reads it back in the pre-encoder)."""
    if HAVE_AV:
        from utils.toy.video_world import write_mp4

        return write_mp4(path, frames)
    import cv2

    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 8, (frames.shape[2], frames.shape[1]))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


# --------------------------------------------------------------------------- one run
class RowClock:
    """Stamps each row of a metrics.jsonl as it appears (polled every 0.1 s): the wall clock of every step as the
    harness sees it, beside the script's own step_seconds."""

    def __init__(self, path):
        self.path, self.stamps, self.started = path, [], time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if os.path.exists(self.path):
                with open(self.path) as f:
                    rows = sum(1 for line in f if line.endswith("\n"))
                now = time.time() - self.started
                self.stamps += [now] * (rows - len(self.stamps))
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def accelerate_command(config, out, extra=()):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            os.path.join(ROOT, "launchers", "accelerate", f"{config}.yaml"), "--num_processes", "1",
            "--main_process_port", str(29500 + zlib.crc32(out.encode()) % 1000), *extra]


def strategy_of(log):
    """What the run's log says it ran as ("one process", "FSDP2", ...): utils/train/run.py's start-up line."""
    with open(log, errors="replace") as f:
        found = re.findall(r"mixed precision \S+; (.+)$", f.read(), re.MULTILINE)
    return found[0].strip() if found else None


def summarize(row, metrics, stamps, warmup, items, code, log):
    """The row's rates: the median step_seconds over the steps after `warmup` and the wall clock over the same steps
    (fewer warm-up steps where the run logged too few), peaks, status."""
    row["steps_logged"] = len(metrics)
    if metrics:
        w = min(warmup, len(metrics) - 1)
        timed = metrics[w:]
        seconds = statistics.median(m["step_seconds"] for m in timed)
        row.update(warmup_used=w, s_per_step=round(seconds, 3), per_s=round(items / seconds, 4),
                   first_loss=metrics[0].get("loss"), step_seconds=[m["step_seconds"] for m in metrics])
        if w >= 1 and len(stamps) >= len(metrics):
            row["wall_s_per_step"] = round((stamps[len(metrics) - 1] - stamps[w - 1]) / (len(metrics) - w), 3)
        if stamps:
            row["first_step_s"] = round(stamps[0], 1)
        peaks = [m["peak_mem_gib"] for m in metrics if "peak_mem_gib" in m]  # none on the CPU
        if peaks:
            row["peak_gib_torch"] = max(peaks)
    if code == 0 and metrics:
        row["status"] = "ok"
    elif code == 124 and metrics:
        row["status"] = f"timed out after {len(metrics)} steps"
    else:
        row["status"] = "timed out" if code == 124 else last_error_line(log)
    return row


class Bench:
    """The call's state: arguments, sizes, folders, the deadline, the rows written after every run."""

    def __init__(self, args):
        self.args = args
        self.size = SIZES["tiny" if args.tiny else "full"]
        self.rows, self.setup = [], []
        self.prepared = {}
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if not HAVE_AV:
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(HERE, "opencv_av"),
                                                                   os.environ.get("PYTHONPATH")]))
        self.logs = os.path.join(args.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        os.makedirs(args.out, exist_ok=True)
        self.combined = os.path.join(args.out, "wan_logs.txt")
        open(self.combined, "w").close()

    # ---- time
    def time_left(self, timeout):
        """Seconds a run may take: its timeout, less than what the deadline leaves (10 s kept for the tables)."""
        if self.args.deadline is None:
            return timeout
        return min(timeout, int(self.args.deadline - (time.time() - STARTED) - 10))

    # ---- subprocesses
    def run(self, name, cmd, timeout):
        """Run `cmd` in its own process group (killed at its end and on timeout), its log appended to wan_logs.txt."""
        log = os.path.join(self.logs, name + ".log")
        code, wall = run_logged(cmd, log, timeout, cwd=ROOT, env=self.env)
        with open(log, errors="replace") as src, open(self.combined, "a") as dst:
            dst.write(f"\n===== {name} (exit {code}, {wall:.1f} s): {' '.join(map(str, cmd))}\n")
            dst.write(src.read()[-200_000:])  # a run's last 200 kB: the file must stay small enough to come back
        return code, wall, log

    def prepare(self, what):
        """A set-up step (models, scorer, videos, encoded folders) once per call: its result, or None if it failed
        (the failure is a row of the set-up table)."""
        if what not in self.prepared:
            started = time.time()
            try:
                result, status = getattr(self, "_prepare_" + what)()
            except Exception as e:  # a broken set-up step fails its sections, not the call
                result, status = None, f"{type(e).__name__}: {e}"[:200]
            self.prepared[what] = result
            self.setup.append(dict(step=what, status=status, wall_s=round(time.time() - started, 1)))
            say(f"set-up {what}: {status} ({time.time() - started:.1f} s)")
            self.write()
        return self.prepared[what]

    def _prepare_model(self):
        if self.args.tiny:
            from utils.toy.tiny import tiny_pipeline_path

            return tiny_pipeline_path("tiny-wan"), "ok (tiny-wan)"
        folder = os.path.join(self.args.models, f"wan2.1-t2v-1.3b-umt5x{self.args.text_layers}")
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            return folder, "ok (saved earlier)"
        return self._subprocess_result("build-model", [sys.executable, os.path.abspath(__file__), "--build", folder,
                                                       str(self.args.text_layers)], folder)

    def _prepare_scorer(self):
        if self.args.tiny:
            return "color_match", "ok (weight-free color_match)"
        folder = os.path.join(self.args.models, "pickscore")
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder, "ok (saved earlier)"
        if not os.path.isdir(os.path.join(self.args.assets, "processor")):
            if importlib.util.find_spec("open_clip") is None:  # the CLIP vocabulary's source
                return None, (f"no {self.args.assets}/processor: carry the folder of bench/distributed.py "
                              f"--write_assets (.bench_assets) and pass it as --assets")
            write_assets(self.args.assets)
        model = self.prepare("model")  # the --build entry builds both; the pipeline first
        if model is None:
            return None, "not run: no model"
        return self._subprocess_result("build-scorer", [sys.executable, os.path.abspath(__file__), "--build", model,
                                                        str(self.args.text_layers), folder, self.args.assets], folder)

    def _subprocess_result(self, name, cmd, result):
        timeout = self.time_left(self.args.timeout)
        if timeout < 20:
            return None, f"not run: --deadline {self.args.deadline} s reached"
        code, _, log = self.run(name, cmd, timeout)
        return (result, "ok") if code == 0 else (None, last_error_line(log))

    def _prepare_videos(self):
        s = self.size
        folder = os.path.join(self.args.work, f"videos-{s['frames']}x{s['height']}x{s['width']}")
        return write_videos(folder, s["clips"], s["frames"], s["height"], s["width"]), "ok"

    def _prepare_encoded_sft(self):
        if self.args.sft_data == "pairs" and (self.args.tiny or self.args.dpo_frames == self.size["frames"]):
            data = self.prepare("encoded_pairs")  # SFT trains on each pair's preferred video
            return data, "ok (the pairs folder)" if data else "not run: no pairs folder"
        return self._encode(pairs=False)

    def _prepare_encoded_pairs(self):
        return self._encode(pairs=True)

    def _encode(self, pairs):
        """The real pre-encoder on the clips (captions.jsonl, or pairs.jsonl with --pairs); a folder finished by an
        earlier call with the same model is kept."""
        model, videos = self.prepare("model"), self.prepare("videos")
        if model is None or videos is None:
            return None, "not run: no model or videos"
        s = self.size
        frames = self.args.dpo_frames if pairs and not self.args.tiny else s["frames"]
        kind = "pairs" if pairs else "sft"
        folder = os.path.join(self.args.work, f"encoded-{kind}-{os.path.basename(model)}-{frames}x{s['height']}x{s['width']}")
        manifest = os.path.join(folder, "manifest.json")
        if os.path.isfile(manifest):
            with open(manifest) as f:
                if json.load(f)["model"] == model:
                    return folder, "ok (encoded earlier)"
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, "-m", "utils.preencode", "--pretrained_model_name_or_path", model, "--dataset_name",
               os.path.join(videos, "pairs.jsonl" if pairs else "captions.jsonl"), "--num_frames", str(frames),
               "--height", str(s["height"]), "--width", str(s["width"]), "--dtype", s["dtype"], "--output_dir", folder,
               *(["--pairs"] if pairs else [])]
        return self._subprocess_result(f"preencode-{kind}", cmd, folder)

    # ---- the measured runs
    def measure(self, section, name, cmd, out, items, unit, strategy=None):
        """One measured run: `cmd` writes metrics.jsonl into `out`; its row is added and the tables rewritten.
        `strategy`: what the run is, where its log does not say (the project's scripts log it)."""
        warmup, timed = self.args.steps or STEPS[section]
        if self.args.tiny:
            warmup, timed = 1, 2
        row = dict(section=section, run=name, unit=unit)
        timeout = self.time_left(self.args.timeout)
        if timeout < 30:
            row["status"] = f"not run: --deadline {self.args.deadline} s reached"
            return self.add(row)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*cmd, "--output_dir", out, "--max_train_steps", str(warmup + timed)]
        say(f"{section} / {name}: {warmup} + {timed} steps, at most {timeout} s")
        with MemorySampler() as memory, RowClock(os.path.join(out, "metrics.jsonl")) as clock:
            code, wall, log = self.run(f"{section}-{name}", cmd, timeout)
        metrics = read_metrics(out)
        row.update(exit_code=code, wall_s=round(wall, 1), strategy=strategy_of(log) or strategy,
                   command=" ".join(map(str, cmd[1:])))
        if memory.peak is not None:
            row["peak_gib_smi"] = round(memory.peak, 2)
        summarize(row, metrics, clock.stamps, warmup, items, code, log)
        shutil.rmtree(out, ignore_errors=True)  # a full transformer is 5.7 GB
        return self.add(row)

    def add(self, row):
        self.rows.append(row)
        plain = next((r for r in self.rows if r["run"] == "plain loop" and r.get("s_per_step")), None)
        ours = next((r for r in self.rows if r["section"] == "sft" and r["run"] == "single_gpu" and r.get("s_per_step")),
                    None)
        if plain and ours:
            plain["ours_over_plain"] = round(ours["s_per_step"] / plain["s_per_step"], 3)
        say(f"{row['section']} / {row['run']}: {row['status']}; s/step {row.get('s_per_step', '-')}, wall s/step "
            f"{row.get('wall_s_per_step', '-')}, peak GiB torch {row.get('peak_gib_torch', '-')} / smi "
            f"{row.get('peak_gib_smi', '-')}")
        self.write()
        return row

    def common(self, model, precision_flag="--mixed_precision"):
        return ["--pretrained_model_name_or_path", model, precision_flag, self.size["precision"], "--report_to", "none",
                "--checkpointing_steps", "100000", "--validation_steps", "100000", "--gradient_checkpointing",
                "--train_batch_size", "1", "--gradient_accumulation_steps", "1"]

    def section_sft(self):
        model, data = self.prepare("model"), self.prepare("encoded_sft")
        for config in self.args.sft_configs:
            if data is None:
                self.add(dict(section="sft", run=config, unit="videos/s", status="not run: no pre-encoded folder"))
                continue
            # launchers/sft_wan.sh's flags; no warm-up (the recipe names none)
            flags = ["train_dpo.py", *self.common(model), "--dataset_name", data, "--sft", "--no-use_lora",
                     "--learning_rate", "5e-6", "--adam_weight_decay", "0.01", "--adam_beta1", "0.9", "--adam_beta2",
                     "0.999", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--weighting_scheme", "none",
                     "--seed", "42"]
            out = os.path.join(self.args.work, f"run-sft-{config}")
            wrap = ["--fsdp_transformer_layer_cls_to_wrap", "WanTransformerBlock"] if config == "fsdp" else []
            self.measure("sft", config, accelerate_command(config, out, wrap) + flags, out, 1, "videos/s")

    def section_plain(self):
        model, data = self.prepare("model"), self.prepare("encoded_sft")
        if data is None:
            return self.add(dict(section="plain", run="plain loop", unit="videos/s",
                                 status="not run: no pre-encoded folder"))
        out = os.path.join(self.args.work, "run-plain")
        flags = [os.path.join("bench", "plain_wan_sft.py"), "--pretrained_model_name_or_path", model, "--dataset_name",
                 data, "--mixed_precision", self.size["precision"], "--gradient_checkpointing", "--seed", "42"]
        self.measure("plain", "plain loop", accelerate_command("single_gpu", out) + flags, out, 1, "videos/s",
                     strategy="one process (plain Accelerator)")

    def section_draftp(self):
        model, scorer = self.prepare("model"), self.prepare("scorer")
        if model is None or scorer is None:
            return self.add(dict(section="draftp", run="single_gpu", unit="videos/s",
                                 status="not run: no model or scorer"))
        s = self.size
        reward = (["--reward_model", "color_match", "--prompts", "colored_animals"] if self.args.tiny else
                  ["--reward_model", "pickscore", "--reward_model_paths", f"pickscore={scorer}", "--prompts", "animals"])
        # launchers/draftp_wan.sh's flags, batch 1 and no accumulation
        flags = ["train_draftp.py", *self.common(model), *reward, "--resolution", str(s["draftp_resolution"]),
                 "--num_frames", str(s["draftp_frames"]), "--num_inference_steps", str(s["inference_steps"]),
                 "--guidance_scale", "5.0", "--reward_frames", "2" if self.args.tiny else "4", "--temporal_weight", "0",
                 "--truncation_steps", "1", "--kl_coeff", "0.2", "--use_lora", "--lora_rank", "32", "--lora_alpha", "64",
                 "--learning_rate", "1e-4", "--adam_weight_decay", "0.0", "--lr_scheduler", "constant_with_warmup",
                 "--lr_warmup_steps", "10", "--max_grad_norm", "10", "--seed", "1234", *self.args.draftp_flags]
        out = os.path.join(self.args.work, "run-draftp")
        self.measure("draftp", "single_gpu", accelerate_command("single_gpu", out) + flags, out, 1, "videos/s")

    def section_dpo(self):
        model, data = self.prepare("model"), self.prepare("encoded_pairs")
        if data is None:
            return self.add(dict(section="dpo", run="single_gpu", unit="pairs/s", status="not run: no pre-encoded pairs"))
        flags = ["train_dpo.py", *self.common(model), "--dataset_name", data, "--use_lora", "--lora_rank", "8",
                 "--lr_warmup_steps", "0", "--seed", "0"]
        out = os.path.join(self.args.work, "run-dpo")
        self.measure("dpo", "single_gpu", accelerate_command("single_gpu", out) + flags, out, 1, "pairs/s")

    # ---- results
    def write(self, final=False):
        """OUT/wan.json and OUT/wan.md (printed too when `final`)."""
        args, s = self.args, self.size
        results = dict(device=gpu_name(), tiny=args.tiny, sizes=s, text_layers=None if args.tiny else args.text_layers,
                       dpo_frames=s["frames"] if args.tiny else args.dpo_frames, setup=self.setup, rows=self.rows,
                       elapsed_s=round(time.time() - STARTED, 1))
        with open(os.path.join(args.out, "wan.json"), "w") as f:
            json.dump(results, f, indent=1)
        text = (f"UMT5 with {args.text_layers} of UMT5-XXL's 24 layers" if not args.tiny else "tiny-wan's UMT5")
        lines = [f"Device: {results['device']}. {'tiny-wan, CPU' if args.tiny else 'Wan 2.1 T2V 1.3B-size, random weights'}"
                 f"; SFT / plain at {s['height']}x{s['width']}x{s['frames']} frames, DPO at "
                 f"{s['height']}x{s['width']}x{results['dpo_frames']}, DRaFT+ at {s['draftp_resolution']}^2 x "
                 f"{s['draftp_frames']} ({s['inference_steps']} steps); text encoder: {text}, character-level T5 "
                 f"tokenizer. s/step: median step_seconds after the warm-up steps; wall: the harness's clock over the "
                 f"same steps.", "",
                 "| section | run | result | strategy | steps (warm-up) | s/step | wall s/step | throughput | "
                 "ours / plain (s/step) | peak GiB torch | peak GiB smi | to 1st step s | wall s |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            rate = f"{r['per_s']} {r['unit']}" if "per_s" in r else "-"
            lines.append(f"| {r['section']} | {r['run']} | {r['status']} | {r.get('strategy') or '-'} | "
                         f"{r.get('steps_logged', '-')} ({r.get('warmup_used', '-')}) | {r.get('s_per_step', '-')} | "
                         f"{r.get('wall_s_per_step', '-')} | {rate} | {r.get('ours_over_plain', '-')} | "
                         f"{r.get('peak_gib_torch', '-')} | {r.get('peak_gib_smi', '-')} | {r.get('first_step_s', '-')} | "
                         f"{r.get('wall_s', '-')} |")
        lines += ["", "| set-up | result | wall s |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['status']} | {r['wall_s']} |" for r in self.setup]
        if final:
            write_markdown(args.out, "wan.md", lines)  # and to stdout
        else:
            with open(os.path.join(args.out, "wan.md"), "w") as f:
                f.write("\n".join(lines) + "\n")


def gpu_name():
    """The GPU's name and memory from nvidia-smi (the harness itself never touches CUDA), or "CPU"."""
    try:
        out = subprocess.run(["nvidia-smi", "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
                              "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out or "CPU"
    except (OSError, subprocess.TimeoutExpired):
        return "CPU"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="wan.json, wan.md, wan_logs.txt (no folders)")
    parser.add_argument("--sections", nargs="*", default=SECTIONS, choices=SECTIONS, help="run in the order given")
    parser.add_argument("--sft_configs", nargs="*", default=["single_gpu", "fsdp"], choices=["single_gpu", "fsdp"],
                        help="the accelerate configs (launchers/accelerate/) of the sft section's runs")
    parser.add_argument("--steps", type=int, nargs=2, default=None, metavar=("WARMUP", "TIMED"),
                        help="steps of every run (default per section: STEPS)")
    parser.add_argument("--sft_data", default="pairs", choices=["pairs", "captions"],
                        help="what sft and plain train on: the DPO section's pairs folder (one pre-encoding for all "
                             "sections; SFT reads each pair's preferred video) or a folder of the clips with captions "
                             "(a second pre-encoding, with its own load of the text encoder). The pairs serve only "
                             "where --dpo_frames is the SFT's 81")
    parser.add_argument("--dpo_frames", type=int, default=81, help="frames of the DPO pairs (4k + 1)")
    parser.add_argument("--text_layers", type=int, default=UMT5_XXL["num_layers"],
                        help="layers of the UMT5 text encoder (UMT5-XXL: 24); fewer saves build and load time")
    parser.add_argument("--draftp_flags", type=shlex.split, default=[],
                        help='extra flags of the DRaFT+ run, one quoted string: --draftp_flags "--compile_sampler off"')
    parser.add_argument("--timeout", type=int, default=300, help="seconds each run (and each set-up step) may take")
    parser.add_argument("--deadline", type=int, default=None,
                        help="seconds for the whole call from its start: a run gets at most what is left less 10 s, "
                             "and is not started with under 30 s left")
    parser.add_argument("--models", default="/tmp/bench-models", help="where the random-weight models are saved")
    parser.add_argument("--assets", default=".bench_assets", help="bench/distributed.py --write_assets (draftp)")
    parser.add_argument("--work", default=None,
                        help="videos, encoded folders, run outputs and logs (default /tmp/bench-wan, -tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny-wan on the CPU, 1 + 2 steps a run: the code path")
    args = parser.parse_args(argv)
    args.work = args.work or ("/tmp/bench-wan-tiny" if args.tiny else "/tmp/bench-wan")
    for name in ("out", "work", "models", "assets"):  # the subprocesses run in the repository root
        setattr(args, name, os.path.abspath(getattr(args, name)))
    if (args.dpo_frames - 1) % 4:
        parser.error("--dpo_frames must be 4k + 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    bench = Bench(args)
    say(f"device {gpu_name()}; sections {' '.join(args.sections)}; deadline {args.deadline} s; work {args.work}")
    for section in args.sections:
        getattr(bench, "section_" + section)()
    bench.write(final=True)
    say("done")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build_main(sys.argv[2:])
    else:
        main()
