"""launchers/: every launcher's command line is accepted by its script's parser (no model or data is loaded),
the published values are the ones passed, the files hold no absolute paths, and the tiny DRaFT+ launcher runs."""
import importlib
import json
import os
import re
import shutil
import sys

import pytest

from conftest import REPO_ROOT, run_command
from utils.train.metrics import read_metrics

LAUNCHERS = sorted(p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "launchers").rglob("*.sh")
                   if "slurm" not in p.parts)  # launchers/slurm/ wraps these (tests/test_distributed.py)
RECIPES = ["alignprop_sd15.sh", "ddpo_sd15.sh", "dpo_flux.sh", "dpo_sd15.sh", "dpo_sdxl.sh", "draft_k1_sd15.sh",
           "draft_lv_sd15.sh", "draftp_sd15.sh", "draftp_sd21.sh", "draftp_sd35.sh", "draftp_sdxl.sh", "draftp_wan.sh",
           "flow_grpo_sd35.sh", "nft_sd35.sh", "sft_sd15.sh", "sft_wan.sh"]
TINY = ["alignprop.sh", "ddpo.sh", "dpo.sh", "dpo_flux.sh", "dpo_sdxl.sh", "draft_k1.sh", "draft_lv.sh", "draftp.sh",
        "draftp_sd2.sh", "draftp_sd3.sh", "draftp_sdxl.sh", "draftp_wan.sh", "flow_grpo.sh", "nft.sh", "sft.sh",
        "sft_wan.sh"]


def test_every_recipe_has_a_launcher_and_a_tiny_variant():
    assert sorted(p for p in LAUNCHERS if p.count("/") == 1) == [f"launchers/{r}" for r in RECIPES]
    assert sorted(p for p in LAUNCHERS if p.startswith("launchers/tiny/")) == [f"launchers/tiny/{t}" for t in TINY]
    configs = sorted(p.name for p in (REPO_ROOT / "launchers" / "accelerate").glob("*.yaml"))
    assert configs == ["ddp.yaml", "deepspeed_zero2.yaml", "fsdp.yaml", "single_gpu.yaml"]


def launch(launcher, tmp_path, env=None):
    """Run `launcher` with the parse-only stub as LAUNCHER; returns (script module, parsed args)."""
    out = tmp_path / "argv.json"
    (tmp_path / "prefs").mkdir(exist_ok=True)  # DATA of the tiny DPO launchers: exists, so nothing is generated
    env = {**os.environ, "LAUNCHER": f"{sys.executable} tests/_parse_only.py", "PARSE_ONLY_OUT": str(out),
           "OUTPUT_DIR": str(tmp_path / "out"), "DATA": str(tmp_path / "prefs"), **(env or {})}
    proc = run_command(["bash", REPO_ROOT / launcher], 60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script, *flags = json.loads(out.read_text())
    assert script in ("train_draftp.py", "train_dpo.py", "train_online.py"), script
    module = importlib.import_module(script[: -len(".py")])
    return module, module.parse_args(flags)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_flags_are_accepted_by_the_script(launcher, tmp_path):
    module, args = launch(launcher, tmp_path)  # parse_args raises (or exits 2) on any unknown or invalid flag
    assert args.output_dir == str(tmp_path / "out")  # the variables at the top reach the flags
    if launcher.startswith("launchers/tiny/"):
        assert args.pretrained_model_name_or_path in ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-sd2", "tiny-wan")
        assert args.mixed_precision == "no"


def test_draftp_sd15_passes_nemo_aligner_defaults(tmp_path):
    _, a = launch("launchers/draftp_sd15.sh", tmp_path)
    assert (a.num_inference_steps, a.eta, a.guidance_scale, a.truncation_steps) == (50, 0.0, 7.5, 1)
    assert (a.kl_coeff, a.use_lora, a.lora_rank, a.learning_rate, a.reward_model) == (1.0, True, 32, 1e-4, "pickscore")
    assert a.train_batch_size * a.gradient_accumulation_steps == 4  # NeMo's global_batch_size on 1 GPU
    assert a.scored_latent == "pred_x0"  # NeMo scores the last DDIM step's predicted x_0


def test_draftp_sd21_passes_its_sources_values(tmp_path):
    """SD 2.1 at its own 768 px (v prediction) with NeMo-Aligner's DRaFT+ values, on the stock schedule."""
    _, a = launch("launchers/draftp_sd21.sh", tmp_path)
    assert a.pretrained_model_name_or_path == "stabilityai/stable-diffusion-2-1" and a.resolution == 768
    assert (a.num_inference_steps, a.eta, a.guidance_scale, a.truncation_steps) == (50, 0.0, 7.5, 1)
    assert (a.kl_coeff, a.use_lora, a.lora_rank, a.learning_rate, a.reward_model) == (1.0, True, 32, 1e-4, "pickscore")
    assert a.train_batch_size * a.gradient_accumulation_steps == 4 and a.scored_latent == "pred_x0"
    assert not a.rescale_zero_terminal_snr  # SD 2.1 was trained on the stock schedule (MaxDiffusion's base21.yml)


def test_draftp_sd35_passes_its_sources_values(tmp_path):
    _, a = launch("launchers/draftp_sd35.sh", tmp_path)
    # Flow-GRPO's pickscore_sd3 sampling and LoRA
    assert (a.resolution, a.num_inference_steps, a.guidance_scale, a.lora_rank, a.lora_alpha) == (512, 10, 4.5, 32, 64)
    # NeMo-Aligner's DRaFT+ method values; its kl_coeff 1.0 scaled by the last step's gain, 0.0089 / 0.0413
    assert (a.truncation_steps, a.learning_rate, a.max_grad_norm, a.reward_model) == (1, 1e-4, 10, "pickscore")
    assert a.kl_coeff == 0.2
    assert a.train_batch_size * a.gradient_accumulation_steps == 4


def test_dpo_flux_passes_its_sources_values(tmp_path):
    _, a = launch("launchers/dpo_flux.sh", tmp_path)
    # diffusers' Diffusion-DPO LoRA command (SDXL): rank 8, lr 1e-5 constant, 16 pairs per step, 2000 steps
    assert (a.use_lora, a.lora_rank, a.learning_rate, a.lr_scheduler, a.lr_warmup_steps) == (True, 8, 1e-5, "constant", 0)
    assert a.train_batch_size * a.gradient_accumulation_steps == 16 and a.max_train_steps == 2000
    # Flow-GRPO's SD3 DPO beta, the paper's data; diffusers' FLUX training: uniform t, guidance embedding 1 in
    # training, 3.5 to sample
    assert (a.beta_dpo, a.dataset_name, a.resolution) == (100, "yuvalkirstain/pickapic_v2", 1024)
    assert (a.weighting_scheme, a.train_guidance_scale, a.guidance_scale, a.num_inference_steps) == ("none", 1.0, 3.5, 28)
    assert a.gradient_checkpointing and a.mixed_precision == "bf16"


def test_draftp_wan_passes_its_sources_values(tmp_path):
    _, a = launch("launchers/draftp_wan.sh", tmp_path)
    assert a.pretrained_model_name_or_path == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert (a.guidance_scale, a.resolution, a.num_frames, a.reward_frames, a.temporal_weight) == (5.0, 480, 33, 4, 0.0)
    # NeMo-Aligner's DRaFT+ method values; its kl_coeff 1.0 scaled by the last step's gain as for SD3.5
    assert (a.truncation_steps, a.learning_rate, a.max_grad_norm, a.reward_model, a.lora_rank) == (1, 1e-4, 10, "pickscore", 32)
    assert a.kl_coeff == 0.2 and a.train_batch_size * a.gradient_accumulation_steps == 4


def test_sft_wan_passes_nemo_automodels_values(tmp_path):
    _, a = launch("launchers/sft_wan.sh", tmp_path)  # DATA exists: no encoding step
    assert (a.pretrained_model_name_or_path, a.sft, a.use_lora) == ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", True, False)
    # NeMo AutoModel's wan2_1_t2v_flow.yaml: AdamW 5e-6, weight decay 0.01, uniform t on the shift-3 sigmas, seed 42
    assert (a.learning_rate, a.adam_weight_decay, a.adam_beta1, a.adam_beta2) == (5e-6, 0.01, 0.9, 0.999)
    assert (a.weighting_scheme, a.seed, a.checkpointing_steps, a.train_batch_size) == ("none", 42, 50, 1)


@pytest.mark.parametrize("launcher, scored", [("launchers/draftp_sdxl.sh", "pred_x0"), ("launchers/draft_k1_sd15.sh", "pred_x0"),
                                              ("launchers/draft_lv_sd15.sh", "pred_x0"), ("launchers/alignprop_sd15.sh", "x_prev")])
def test_draft_recipes_score_their_sources_latent(launcher, scored, tmp_path):
    _, a = launch(launcher, tmp_path)
    assert a.scored_latent == scored


@pytest.mark.parametrize("launcher", ["launchers/dpo_sd15.sh", "launchers/dpo_sdxl.sh"])
@pytest.mark.parametrize("gpus", [8, 16])
def test_dpo_launchers_keep_the_published_batch_and_lr(launcher, gpus, tmp_path):
    _, a = launch(launcher, tmp_path, env={"GPUS": str(gpus)})
    assert gpus * a.train_batch_size * a.gradient_accumulation_steps == 2048
    assert (a.learning_rate, a.scale_lr, a.beta_dpo, a.max_train_steps, a.use_lora) == (1e-8, True, 5000, 2000, False)
    if "sdxl" in launcher:
        assert a.use_adafactor and a.gradient_checkpointing and a.resolution == 1024


def test_alignprop_draws_k_per_batch_over_the_whole_chain(tmp_path):
    _, a = launch("launchers/alignprop_sd15.sh", tmp_path)
    assert a.truncation_steps_random == (1, 50) and a.gradient_checkpointing
    assert 4 * a.train_batch_size * a.gradient_accumulation_steps == 128  # AlignProp: 4 GPUs x 4 x 8


ABSOLUTE = re.compile(r"""(^|[\s="'(:])(/|~/)[A-Za-z]""")


def test_no_absolute_paths():
    files = [REPO_ROOT / p for p in LAUNCHERS] + list((REPO_ROOT / "launchers" / "accelerate").glob("*.yaml"))
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("#!"):
                continue
            assert not ABSOLUTE.search(line), f"{path.relative_to(REPO_ROOT)}:{number}: {line}"


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: str(load_config_from_file(str(REPO_ROOT / "launchers" / "accelerate" / f"{name}.yaml")).distributed_type.value)
             for name in ["single_gpu", "ddp", "deepspeed_zero2", "fsdp"]}
    assert kinds == {"single_gpu": "NO", "ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}


def shell_env_without_venv(**extra):
    """The environment of a new shell in which no virtual environment is active: no venv bin/ on PATH."""
    venv_bins = {os.path.realpath(os.path.dirname(sys.executable)), os.path.realpath(REPO_ROOT / ".venv" / "bin")}
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and os.path.realpath(p) not in venv_bins)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "LAUNCHER", "PYTHON", "ACCELERATE_LAUNCH")}
    return {**env, "PATH": path, **extra}


def test_tiny_draftp_launcher_runs_end_to_end(tmp_path, tiny_sd_path):
    """The launcher as users run it, `MAX_STEPS=2 bash launchers/tiny/draftp.sh` in a shell without the venv
    activated: launchers/env.bash finds the project's .venv (`accelerate launch` with single_gpu.yaml), 2 steps."""
    if not (REPO_ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in the repository (the README's set-up line makes it)")
    out = tmp_path / "out"
    env = shell_env_without_venv(MAX_STEPS="2", OUTPUT_DIR=str(out))
    if shutil.which("accelerate", path=env["PATH"]):
        pytest.skip("an `accelerate` outside the venv is on PATH: the test would not show that the venv is found")
    proc = run_command(["bash", REPO_ROOT / "launchers" / "tiny" / "draftp.sh"], 300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2] and all("kl" in m for m in metrics)
    assert json.loads((out / "args.json").read_text())["kl_coeff"] == 0.1
    # quiet by default: no bitsandbytes "pip install kernels" warning, no diffusers "should be kept in float32: []"
    # lines, no transformers weight-loading bars (the run's own progress bar and log lines stay)
    for noise in ("pip install kernels", "should be kept in float32", "Loading weights"):
        assert noise not in proc.stderr, proc.stderr[-4000:]
    assert "samples per optimizer step" in proc.stderr


def test_flow_grpo_sd35_passes_flow_grpos_pickscore_recipe(tmp_path):
    """config/grpo.py pickscore_sd3: 48 prompts x 24 images per epoch in 2 updates, 10 steps, guidance 4.5, beta
    0.01, clip 1e-4, timestep fraction 0.99, global std; LoRA r 32 alpha 64, lr 3e-4."""
    _, a = launch("launchers/flow_grpo_sd35.sh", tmp_path)
    images = 8 * a.train_batch_size * a.gradient_accumulation_steps * a.updates_per_epoch
    assert (images, a.group_size, a.updates_per_epoch) == (48 * 24, 24, 2)
    assert (a.num_inference_steps, a.guidance_scale, a.noise_level, a.kl_beta, a.clip_range) == (10, 4.5, 0.7, 0.01, 1e-4)
    assert (a.timestep_fraction, a.global_std, a.lora_rank, a.lora_alpha, a.learning_rate) == (0.99, True, 32, 64, 3e-4)


def test_flow_grpo_sd35_geneval_recipe_scores_through_the_reward_server(tmp_path):
    """RECIPE=geneval: config/grpo.py geneval_sd3's beta 0.04, the http reward at GENEVAL_URL, prompts from GenEval's
    metadata file; without GENEVAL_URL the launcher stops before launching, naming it."""
    _, a = launch("launchers/flow_grpo_sd35.sh", tmp_path, {"RECIPE": "geneval", "GENEVAL_URL": "http://127.0.0.1:18085/"})
    assert (a.reward_model, a.reward_model_paths, a.kl_beta) == ("http", ["http=http://127.0.0.1:18085/"], 0.04)
    assert (a.prompts, a.prompt_column, a.group_size, a.guidance_scale) == (
        "dataset/geneval/train_metadata.jsonl", "prompt", 24, 4.5)
    env = {**os.environ, "RECIPE": "geneval", "LAUNCHER": "false"}
    env.pop("GENEVAL_URL", None)
    proc = run_command(["bash", REPO_ROOT / "launchers/flow_grpo_sd35.sh"], 60, cwd=tmp_path, env=env)
    assert proc.returncode != 0 and "GENEVAL_URL" in proc.stderr


def test_the_tiny_online_launcher_trains(tmp_path):
    """launchers/tiny/flow_grpo.sh end to end (one process, 2 steps): weights and metrics written."""
    env = {**os.environ, "OUTPUT_DIR": str(tmp_path / "out"), "MAX_STEPS": "2",
           "LAUNCHER": f"{sys.executable}"}
    proc = run_command(["bash", REPO_ROOT / "launchers/tiny/flow_grpo.sh"], 600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(str(tmp_path / "out"))] == [1, 2]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()

