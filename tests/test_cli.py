"""The command line as a new user meets it: --help of every script (help text and defaults with their source),
one-line errors before any model loads, the guard against rerunning into an earlier run's --output_dir, the DPO
learning rate that follows --use_lora, and a quiet stderr."""
import argparse
import os

import pytest
import torch

import evaluate
import train_dpo
import train_draftp
from tests.conftest import run_script
from utils import UsageError
from utils.train.cli import check_common_args, clear_earlier_run

SCRIPTS = {"train_draftp.py": train_draftp, "train_dpo.py": train_dpo, "evaluate.py": evaluate}
NEMO = "from NeMo-Aligner's DRaFT+ config"


class _Parsed(Exception):
    pass


@pytest.fixture
def built_parser(monkeypatch):
    """The parser a script's parse_args builds, caught just before it parses (so nothing is checked or loaded)."""
    def build(module):
        caught = {}

        def catch(self, args=None, namespace=None):
            caught["parser"] = self
            raise _Parsed

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(_Parsed):
            module.parse_args([])
        monkeypatch.undo()
        return caught["parser"]
    return build


def help_lines(parser, monkeypatch) -> dict:
    """--help as the user reads it: {flag: its entry (the flag's line and its help below it) as one line}."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    entries, flag = {}, None
    for line in parser.format_help().splitlines():
        words = line.split()
        if line.startswith("  -") and words[0].startswith("--"):
            flag = words[0].rstrip(",")
            entries[flag] = line.strip()
        elif flag and line.startswith("   "):  # the help text, on the next line when the flag's own is long
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_flag_has_a_help_line(script, built_parser):
    parser = built_parser(SCRIPTS[script])
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert missing == [], f"{script}: flags without help: {missing}"


def test_draftp_help_shows_the_defaults_and_where_they_come_from(built_parser, monkeypatch):
    lines = help_lines(built_parser(train_draftp), monkeypatch)
    expected = {  # NeMo-Aligner's draftp_sd.yaml, as shared/DESIGN.md lists it
        "--learning_rate": f"(default: 0.0001, {NEMO})", "--lora_rank": f"(default: 32, {NEMO})",
        "--adam_weight_decay": f"(default: 0.0, {NEMO})", "--max_grad_norm": f"(default: 10.0, {NEMO})",
        "--eta": f"(default: 0.0, {NEMO})", "--truncation_steps": f"(default: 1, {NEMO})",
        # per family, from the stock diffusers pipelines (SD1.5 50 / 7.5 as NeMo-Aligner's config)
        "--num_inference_steps": "SD1.5 50, SDXL 50, SD3 / SD3.5 28, FLUX.1 28",
        "--guidance_scale": "SD1.5 7.5, SDXL 5.0, SD3 / SD3.5 7.0, FLUX.1 3.5",
        "--reward_model": f"(default: pickscore, {NEMO})",
        # this project's own
        "--seed": "(default: 0)", "--max_train_steps": "(default: 1000)", "--output_dir": "(default: outputs/run)",
        "--report_to": "(default: tensorboard)", "--kl_coeff": "(default: 0.0)",
    }
    for flag, text in expected.items():
        assert text in lines[flag], lines[flag]
    from utils.rewards import list_rewards

    assert all(name in lines["--reward_model"] for name in list_rewards())


def test_dpo_help_shows_the_defaults_and_where_they_come_from(built_parser, monkeypatch):
    lines = help_lines(built_parser(train_dpo), monkeypatch)
    source = "from the Diffusion-DPO train.py"
    for flag, text in {"--beta_dpo": f"SD1.5 / SDXL 5000, {source}; SD3 / FLUX 100, from Flow-GRPO",
                       "--max_train_steps": f"(default: 2000, {source})",
                       "--lr_warmup_steps": f"(default: 500, {source})", "--seed": "(default: 0)",
                       "--adam_weight_decay": f"(default: 0.01, {source})", "--max_grad_norm": f"(default: 1.0, {source})",
                       "--output_dir": "(default: outputs/run)", "--report_to": f"(default: tensorboard, {source})"}.items():
        assert text in lines[flag], lines[flag]
    assert "1e-08 for the full UNet" in lines["--learning_rate"] and "0.0005 with --use_lora" in lines["--learning_rate"]
    assert "in DRaFT" not in lines["--channels_last"]  # the DPO script's own wording


def test_dpo_learning_rate_follows_use_lora_and_is_recorded(tmp_path):
    base = ["--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", "x", "--output_dir", str(tmp_path)]
    assert train_dpo.parse_args(base).learning_rate == train_dpo.FULL_UNET_LEARNING_RATE == 1e-8
    assert train_dpo.parse_args(base + ["--use_lora"]).learning_rate == train_dpo.LORA_LEARNING_RATE == 5e-4
    assert train_dpo.parse_args(base + ["--use_lora", "--learning_rate", "1e-5"]).learning_rate == 1e-5
    assert vars(train_dpo.parse_args(base + ["--use_lora"]))["learning_rate"] == 5e-4  # what args.json holds


# --------------------------------------------------------------------------- --output_dir
DRAFTP = ["--pretrained_model_name_or_path", "tiny-sd", "--reward_model", "brightness"]


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    for module, flags in ((train_draftp, DRAFTP), (evaluate, DRAFTP[:2] + ["--reward_models", "brightness"])):
        with pytest.raises(UsageError, match="--output_dir .* is a file"):
            module.parse_args(flags + ["--output_dir", str(tmp_path / "run")])


def earlier_run(folder):
    """What a finished LoRA run without checkpoints leaves, plus a checkpoint, its tracker logs and a user's file."""
    (folder / "samples").mkdir(parents=True)
    for name in ("args.json", "metrics.jsonl", "pytorch_lora_weights.safetensors", "samples/validation-step-000009.png",
                 "notes.txt"):
        (folder / name).write_text("earlier")
    (folder / "logs" / "draftp").mkdir(parents=True)
    return folder


def test_a_rerun_into_an_earlier_run_is_refused_naming_what_is_there(tmp_path):
    out = earlier_run(tmp_path / "run")
    with pytest.raises(UsageError, match=r"already holds an earlier run \(args.json, metrics.jsonl, samples, "
                                         r"pytorch_lora_weights.safetensors\); pass --overwrite_output_dir"):
        train_draftp.parse_args(DRAFTP + ["--output_dir", str(out)])
    train_draftp.parse_args(DRAFTP + ["--output_dir", str(out), "--overwrite_output_dir"])
    train_draftp.parse_args(DRAFTP + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])  # resume
    train_draftp.parse_args(DRAFTP + ["--output_dir", str(tmp_path / "new")])  # a new folder, or an empty one
    with pytest.raises(UsageError, match="pass one of them"):
        train_draftp.parse_args(DRAFTP + ["--output_dir", str(out), "--overwrite_output_dir",
                                          "--resume_from_checkpoint", "latest"])


def test_overwrite_output_dir_deletes_the_earlier_run_and_nothing_else(tmp_path):
    out = earlier_run(tmp_path / "run")
    (out / "checkpoint-5").mkdir()
    (out / ".checkpoint-10.partial").mkdir()
    args = train_draftp.parse_args(DRAFTP + ["--output_dir", str(out), "--overwrite_output_dir"])
    clear_earlier_run(args)
    assert sorted(os.listdir(out)) == ["notes.txt"]
    check_common_args(argparse.Namespace(**{**vars(args), "overwrite_output_dir": False}))  # nothing left to refuse


# --------------------------------------------------------------------------- errors before loading, end to end
def one_error_line(proc, needle):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a GPU")
def test_fp16_on_a_cpu_is_one_line_before_the_models_load(tmp_path):
    proc = run_script(["train_draftp.py", *DRAFTP, "--mixed_precision", "fp16", "--output_dir", tmp_path / "run"],
                      expect_ok=False)
    one_error_line(proc, "--mixed_precision fp16")
    assert "SD1.5 at" not in proc.stderr  # logged once the models are loaded
    assert not (tmp_path / "run").exists()  # and before anything was written


def test_a_preference_set_of_only_ties_is_one_line_before_the_models_load(tmp_path):
    import datasets

    from tests.test_dpo import png

    data = str(tmp_path / "ties")
    datasets.Dataset.from_list([{"jpg_0": png((1, 2, 3)), "jpg_1": png((3, 2, 1)), "caption": "c", "label_0": 0.5}] * 3
                               ).save_to_disk(data)
    proc = run_script(["train_dpo.py", "--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", data,
                       "--output_dir", tmp_path / "run", "--report_to", "none"], expect_ok=False)
    one_error_line(proc, "the dataset has 0 usable rows (3 pairs with a tie, label_0 = 0.5, were dropped)")
    assert not (tmp_path / "run").exists()  # found before the accelerator, the output folder and the models


def test_a_caption_that_is_not_text_is_one_line_before_the_models_load(tmp_path):
    import datasets

    from tests.test_dpo import png

    data = str(tmp_path / "numbers")
    datasets.Dataset.from_list([{"jpg_0": png((1, 2, 3)), "jpg_1": png((3, 2, 1)), "caption": 7, "label_0": 1.0}] * 3
                               ).save_to_disk(data)
    proc = run_script(["train_dpo.py", "--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", data,
                       "--output_dir", tmp_path / "run", "--report_to", "none"], expect_ok=False)
    one_error_line(proc, "row 0: column 'caption' holds int, expected a caption string")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--lora_rank", "8"], ["--lora_alpha", "16"]])
def test_lora_flags_without_use_lora_are_one_line_where_lora_is_off_by_default(flags, tmp_path):
    """train_dpo.py trains the full UNet by default: `--lora_rank 8` alone would silently train the full model.
    Mutation: dropping the check in check_common_args fails here."""
    base = ["--pretrained_model_name_or_path", "tiny-sd", "--output_dir", str(tmp_path / "run"), "--dataset_name",
            str(tmp_path)]
    with pytest.raises(UsageError, match=rf"{flags[0]} given, but this script trains the full model unless told "
                                         rf"--use_lora"):
        train_dpo.parse_args(base + flags)
    assert train_dpo.parse_args(base + flags + ["--use_lora"]).use_lora  # asked for: LoRA
    assert not train_dpo.parse_args(base + flags + ["--no-use_lora"]).use_lora  # the full model, on purpose
    assert train_draftp.parse_args(base[:4] + flags).use_lora  # LoRA is train_draftp.py's default


@pytest.mark.parametrize("script", ["train_draftp.py", "train_dpo.py"])
def test_an_abbreviated_or_misspelled_flag_is_one_line_naming_the_closest(script, capsys):
    """argparse's default would take `--learning_rat` for --learning_rate (allow_abbrev)."""
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--learning_rat", "1e-3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized argument --learning_rat; did you mean --learning_rate?\n"

