"""Per-family defaults resolved once the model's family is read (model_index.json, before any weight loads): sampling
steps and guidance for train_draftp.py, train_dpo.py's validation images and evaluate.py; train_dpo.py's --beta_dpo;
the refusal of --use_lora --scale_lr without --learning_rate; the SDXL recipes' launcher settings."""
import json

import pytest

import evaluate
import train_dpo
import train_draftp
from tests.conftest import REPO_ROOT
from tests.test_launchers import launch
from utils import UsageError
from utils.sampling import SAMPLING_DEFAULTS
from utils.toy.synthetic import build_synthetic_preferences

# name -> (steps, guidance): the stock diffusers pipelines' __call__ defaults (diffusers 0.42)
STOCK = {"tiny-sd": (50, 7.5), "tiny-sdxl": (50, 5.0), "tiny-sd3": (28, 7.0), "tiny-flux": (28, 3.5)}


class Loaded(Exception):
    """Raised where the script would load the weights: everything before it (args.json included) has run."""


def _stop_at_load(*args, **kwargs):
    raise Loaded


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return build_synthetic_preferences(str(tmp_path_factory.mktemp("prefs") / "data"), num_pairs=4, seed=0)


def test_the_table_is_the_stock_pipelines_call_defaults():
    """SAMPLING_DEFAULTS against the installed diffusers' own __call__ signatures. Mutation: FLUX's entry as SD1.5's
    (50, 7.5), the defaults before per-family resolution."""
    import inspect

    from diffusers import (FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)

    for key, pipe in (("sd", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline),
                      ("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)):
        params = inspect.signature(pipe.__call__).parameters
        assert SAMPLING_DEFAULTS[key] == {flag: params[flag].default for flag in ("num_inference_steps", "guidance_scale")}


@pytest.mark.parametrize("name", list(STOCK))
def test_train_draftp_resolves_steps_and_guidance_per_family(name, tmp_path):
    """Mutation: resolve_family_defaults without its resolve_sampling_defaults call (None reaches the sampler)."""
    args = train_draftp.parse_args(["--pretrained_model_name_or_path", name, "--reward_model", "brightness",
                                    "--output_dir", str(tmp_path)])
    assert (args.num_inference_steps, args.guidance_scale) == (None, None)  # not decided before the family is known
    train_draftp.resolve_family_defaults(args)
    assert (args.num_inference_steps, args.guidance_scale) == STOCK[name]


def test_an_explicit_flag_wins_and_truncation_is_checked_against_the_resolved_steps(tmp_path):
    base = ["--pretrained_model_name_or_path", "tiny-flux", "--reward_model", "brightness", "--output_dir", str(tmp_path)]
    args = train_draftp.parse_args(base + ["--guidance_scale", "7.5", "--num_inference_steps", "10"])
    train_draftp.resolve_family_defaults(args)
    assert (args.num_inference_steps, args.guidance_scale) == (10, 7.5)
    args = train_draftp.parse_args(base + ["--truncation_steps", "30"])  # FLUX: 28 steps by default
    with pytest.raises(UsageError, match="--truncation_steps must be in \\[1, --num_inference_steps=28\\]"):
        train_draftp.resolve_family_defaults(args)
    with pytest.raises(UsageError, match="--timestep_spacing"):
        train_draftp.resolve_family_defaults(train_draftp.parse_args(base + ["--timestep_spacing", "trailing"]))


def test_train_draftp_writes_the_resolved_values_into_args_json(tmp_path, monkeypatch, fresh_accelerate_state):
    """FLUX.1-dev layout: args.json says 28 steps and guidance 3.5, not SD1.5's 50 and 7.5. Mutation: main without its
    resolve_family_defaults(args) line (args.json then holds null)."""
    monkeypatch.setattr(train_draftp, "load_pipeline_parts", _stop_at_load)
    args = train_draftp.parse_args(["--pretrained_model_name_or_path", "tiny-flux", "--reward_model", "brightness",
                                    "--output_dir", str(tmp_path), "--report_to", "none"])
    with pytest.raises(Loaded):
        train_draftp.main(args)
    saved = json.loads((tmp_path / "args.json").read_text())
    assert (saved["num_inference_steps"], saved["guidance_scale"]) == (28, 3.5)


@pytest.mark.parametrize("name, beta", [("tiny-sd", 5000.0), ("tiny-sdxl", 5000.0), ("tiny-sd3", 100.0),
                                        ("tiny-flux", 100.0)])
def test_train_dpo_resolves_validation_sampling_and_beta_per_family(name, beta, prefs, tmp_path):
    """Flow models get Flow-GRPO's SD3 DPO beta 100, SD1.5 / SDXL the Diffusion-DPO train.py's 5000. Mutation: BETA_DPO's
    "flow" entry set to 5000 (the one default for all families)."""
    base = ["--pretrained_model_name_or_path", name, "--dataset_name", prefs, "--output_dir", str(tmp_path)]
    args = train_dpo.parse_args(base)
    assert (args.beta_dpo, args.num_inference_steps, args.guidance_scale) == (None, None, None)
    train_dpo.check_family_args(args, *train_dpo.read_family(name))
    assert (args.num_inference_steps, args.guidance_scale) == STOCK[name]
    assert args.beta_dpo == beta
    given = train_dpo.parse_args(base + ["--beta_dpo", "2500", "--guidance_scale", "2", "--num_inference_steps", "4"])
    train_dpo.check_family_args(given, *train_dpo.read_family(name))
    assert (given.beta_dpo, given.guidance_scale, given.num_inference_steps) == (2500, 2, 4)  # an explicit flag wins


def test_train_dpo_writes_the_resolved_values_into_args_json(prefs, tmp_path, monkeypatch, fresh_accelerate_state):
    """Mutation: check_family_args without its resolve_sampling_defaults call (args.json then holds null)."""
    monkeypatch.setattr(train_dpo, "load_pipeline_parts", _stop_at_load)
    args = train_dpo.parse_args(["--pretrained_model_name_or_path", "tiny-sd3", "--dataset_name", prefs,
                                 "--output_dir", str(tmp_path), "--report_to", "none"])
    with pytest.raises(Loaded):
        train_dpo.main(args)
    saved = json.loads((tmp_path / "args.json").read_text())
    assert (saved["num_inference_steps"], saved["guidance_scale"], saved["beta_dpo"]) == (28, 7.0, 100.0)


def test_evaluate_writes_the_resolved_values_into_args_json(tmp_path, monkeypatch, fresh_accelerate_state):
    """Mutation: evaluate.main without its resolve_sampling_defaults line (args.json then holds null, and the sampler
    gets None steps)."""
    monkeypatch.setattr(evaluate, "load_reward", _stop_at_load)  # the first thing main loads after args.json
    args = evaluate.parse_args(["--pretrained_model_name_or_path", "tiny-flux", "--reward_models", "brightness",
                                "--diversity", "none", "--output_dir", str(tmp_path)])
    with pytest.raises(Loaded):
        evaluate.main(args)
    saved = json.loads((tmp_path / "args.json").read_text())
    assert (saved["num_inference_steps"], saved["guidance_scale"]) == (28, 3.5)


@pytest.mark.parametrize("module, flags", [
    (train_draftp, []), (train_dpo, ["--dataset_name", "x"]), (evaluate, [])])
def test_help_states_the_per_family_defaults(module, flags, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one help line per flag
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "SD1.5 50, SDXL 50, SD3 / SD3.5 28, FLUX.1 28" in text
    assert "SD1.5 7.5, SDXL 5.0, SD3 / SD3.5 7.0, FLUX.1 3.5" in text
    if module is train_dpo:
        assert "SD1.5 / SDXL 5000, from the Diffusion-DPO train.py; SD3 / FLUX 100, from Flow-GRPO" in text


# --------------------------------------------------------------------------- --use_lora --scale_lr
def test_lora_with_scale_lr_needs_an_explicit_learning_rate(tmp_path):
    """The LoRA default 5e-4 is a per-step rate: --scale_lr would make it 5e-4 x 2048 = 1.0 at the paper's batch.
    Mutation: resolve_learning_rate without its refusal (the run then trains at 5e-4 x the global batch)."""
    base = ["--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", "x", "--output_dir", str(tmp_path)]
    with pytest.raises(UsageError) as e:
        train_dpo.parse_args(base + ["--use_lora", "--scale_lr"])
    message = str(e.value)
    assert "\n" not in message and "--scale_lr" in message and "--use_lora" in message and "--learning_rate" in message
    assert train_dpo.parse_args(base + ["--use_lora", "--scale_lr", "--learning_rate", "1e-6"]).learning_rate == 1e-6
    assert train_dpo.parse_args(base + ["--scale_lr"]).learning_rate == 1e-8  # full UNet: the paper's per-pair base


# --------------------------------------------------------------------------- launchers
def test_draftp_sdxl_samples_at_nemos_timesteps(tmp_path):
    """launchers/draftp_sdxl.sh: 40 DDIM steps with trailing spacing (999 ... 24, NeMo-Aligner's SDXL sampler) and the
    last step's pred_x0 scored. Mutation: --timestep_spacing trailing dropped from the launcher."""
    _, a = launch("launchers/draftp_sdxl.sh", tmp_path)
    assert (a.num_inference_steps, a.timestep_spacing, a.scored_latent, a.eta) == (40, "trailing", "pred_x0", 0.0)


def test_dpo_sdxl_launcher_says_where_its_conditioning_differs_from_the_paper():
    """The behaviour is tested in tests/test_dpo.py (test_sdxl_time_ids_come_from_each_images_own_size_and_crop) and
    tests/test_foundation.py (force_zeros_for_empty_prompt); the recipe must say that it differs from train.py there.
    Mutation: the launcher's conditioning paragraph removed."""
    text = (REPO_ROOT / "launchers" / "dpo_sdxl.sh").read_text()
    assert "[res, res, 0, 0, res, res]" in text and "force_zeros_for_empty_prompt" in text
    assert "not a bit-exact reproduction" in text
