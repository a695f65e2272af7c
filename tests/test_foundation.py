"""The foundation: tiny offline pipelines, model loading and prompt encoding, LoRA in the diffusers format,
checkpoints and metrics, and bad input. Each test checks behaviour against an independent reference where one
exists (the stock diffusers pipelines, open_clip's own tokenizer, an uninterrupted run)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

from utils import UsageError
from utils.models import (
    adapters_disabled, add_lora, build_pipeline, encode_prompts, is_sdxl_index, load_pipeline_parts, save_lora,
)
from utils.train import run_main
from utils.train.checkpoints import list_checkpoints, register_checkpoint_hooks, resume_from_checkpoint, save_checkpoint
from utils.train.cli import add_common_args, check_common_args
from utils.train.metrics import MetricsLog, read_metrics
from utils.train.optim import build_lr_scheduler, build_optimizer
from utils.train.run import make_accelerator

FLAG = "--pretrained_model_name_or_path"


# --------------------------------------------------------------------------- helpers
def generate(pipe, seed: int, size=None, prompt="a photo of a cat") -> np.ndarray:
    """(1, H, W, 3) float image in [0, 1]; 2 DDIM steps with CFG, enough to exercise the whole pipeline.
    `size` None: the pipeline's default resolution; smaller sizes keep the CPU tests fast."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(seed),
                height=size, width=size, output_type="np").images


def stock_pipeline(path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path)


def parse_common(*flags):
    parser = add_common_args(argparse.ArgumentParser())
    return parser.parse_args([FLAG, "tiny-sd", "--report_to", "none", "--mixed_precision", "no", *map(str, flags)])


@pytest.fixture(scope="module")
def sd_parts(tiny_sd_path):
    return load_pipeline_parts("tiny-sd")


@pytest.fixture(scope="module")
def sdxl_parts(tiny_sdxl_path):
    return load_pipeline_parts("tiny-sdxl")


# --------------------------------------------------------------------------- tokenizer
# Reference ids of the real openai CLIP tokenizer (openai/clip-vit-large-patch14, SD1.5's and SDXL's first
# tokenizer). Worked out from the vocabulary's layout: ids 0-255 are the 256 byte symbols in the GPT-2/CLIP
# byte order (printable '!'..'~' first, so '!' = 0 and 'a' = 97 - 33 = 64), ids 256-511 the same symbols with
# the end-of-word marker ('a</w>' = 256 + 64 = 320, '!</w>' = 256, ','</w> = 256 + 11 = 267), then the 48,894
# merges, then <|startoftext|> = 49406 and <|endoftext|> = 49407 (vocabulary size 49408). 'photo</w>' = 1125,
# 'of</w>' = 539, 'cat</w>' = 2368, 'dog</w>' = 1929, 'hello</w>' = 3306, 'world</w>' = 1002 are the widely
# published ids of these merged words (e.g. the Hugging Face CLIP docs' "a photo of a cat" example).
KNOWN_CLIP_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "A PHOTO of  a Cat!": [49406, 320, 1125, 539, 320, 2368, 256, 49407],  # lower-cased, whitespace squeezed
}


def test_tiny_tokenizers_tokenize_english_like_real_clip(tiny_sd_path, tiny_sdxl_path):
    import open_clip
    from transformers import AutoTokenizer

    from utils.toy.tiny import build_clip_tokenizer

    # The tokenizer saved in the tiny pipeline (what the scripts load) and a freshly built one.
    tok = AutoTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    for t in (tok, build_clip_tokenizer()):
        assert len(t) == 49408 and t.model_max_length == 77
        for text, ids in KNOWN_CLIP_IDS.items():
            assert t(text).input_ids == ids, text
    # The original CLIP tokenizer (open_clip's SimpleTokenizer, an independent implementation) on prompts
    # with punctuation, digits, apostrophes and rare words that split into several sub-words.
    reference = open_clip.tokenizer.SimpleTokenizer()
    for text in ["an astronaut riding a horse on mars, 4k, trending on artstation",
                 "Van Gogh's 'Starry Night' over a cyberpunk Tokyo street at dusk",
                 "a hedgehog playing chess; hyperrealistic photograph (35mm)"]:
        assert tok(text).input_ids == [49406, *reference.encode(text), 49407], text

    # Padding as the real SD tokenizers: SD1.5 / SDXL's first pads with <|endoftext|>, SDXL's second
    # (laion open_clip ViT-bigG) pads with '!' (id 0); both pad and truncate to 77.
    tok2 = AutoTokenizer.from_pretrained(tiny_sdxl_path, subfolder="tokenizer_2")
    for t, pad_id in [(tok, 49407), (tok2, 0)]:
        ids = t("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert ids[:7] == KNOWN_CLIP_IDS["a photo of a cat"] and ids[7:] == [pad_id] * 70
        long = t(" ".join(["cat"] * 100), padding="max_length", max_length=77, truncation=True).input_ids
        assert len(long) == 77 and long[-1] == 49407


# --------------------------------------------------------------------------- tiny pipelines
@pytest.mark.parametrize("name,cls_name", [("tiny-sd", "StableDiffusionPipeline"),
                                           ("tiny-sdxl", "StableDiffusionXLPipeline")])
def test_tiny_pipeline_reloads_from_disk_and_generates(name, cls_name, request):
    from utils.toy.tiny import TINY_RESOLUTION, build_tiny_pipeline

    path = request.getfixturevalue("tiny_sd_path" if name == "tiny-sd" else "tiny_sdxl_path")
    pipe = stock_pipeline(path)
    assert type(pipe).__name__ == cls_name
    # The saved folder holds exactly what the seeded build makes (catches a stale cache: bump TINY_VERSION).
    built = build_tiny_pipeline(name).components
    for part, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            want, got = built[part].state_dict(), module.state_dict()
            assert want.keys() == got.keys(), part
            assert all(torch.equal(want[k], got[k]) for k in want), f"cached {name}/{part} differs from its build: bump TINY_VERSION"

    a, b, c = generate(pipe, 0), generate(pipe, 0), generate(pipe, 1)
    assert a.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3) == (1, 64, 64, 3)
    assert np.isfinite(a).all() and a.std() > 1e-3  # an image, not a constant
    assert np.array_equal(a, b), "same seed must give the same image"
    assert np.abs(a - c).max() > 1e-2, "another seed must give another image"


# --------------------------------------------------------------------------- loading and detection
def test_sd15_and_sdxl_are_told_apart(sd_parts, sdxl_parts, tiny_sd_path, tiny_sdxl_path, tmp_path):
    assert not sd_parts.is_sdxl and len(sd_parts.text_encoders) == len(sd_parts.tokenizers) == 1
    assert sdxl_parts.is_sdxl and len(sdxl_parts.text_encoders) == len(sdxl_parts.tokenizers) == 2
    assert sdxl_parts.force_zeros_for_empty_prompt and not sd_parts.force_zeros_for_empty_prompt
    assert sd_parts.default_resolution == sdxl_parts.default_resolution == 64
    for path, sdxl in [(tiny_sd_path, False), (tiny_sdxl_path, True)]:
        with open(os.path.join(path, "model_index.json")) as f:
            assert is_sdxl_index(json.load(f)) is sdxl
    # From the pipeline's own index, never its name: tiny-sd in a folder named like an SDXL model is SD1.5.
    disguised = tmp_path / "stable-diffusion-xl-base-1.0"
    disguised.mkdir()
    for entry in os.listdir(tiny_sd_path):
        (disguised / entry).symlink_to(os.path.join(tiny_sd_path, entry))
    assert not load_pipeline_parts(str(disguised)).is_sdxl
    assert not is_sdxl_index({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": [None, None]})


def test_separate_vae_is_loaded(sd_parts, tmp_path):
    # --pretrained_vae_model_name_or_path: a VAE folder of its own (here the tiny VAE with one weight changed).
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd_parts.path, subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1.0)
    vae.save_pretrained(tmp_path / "my-vae")
    parts = load_pipeline_parts("tiny-sd", vae_name_or_path=str(tmp_path / "my-vae"))
    assert torch.equal(parts.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert not torch.equal(parts.vae.encoder.conv_in.weight, sd_parts.vae.encoder.conv_in.weight)


# --------------------------------------------------------------------------- prompt encoding
PROMPTS = ["a photo of a cat", "", "a red fox sitting in the snow"]


def test_encode_prompts_sd15_matches_stock_pipeline(sd_parts, tiny_sd_path):
    cond = encode_prompts(sd_parts, PROMPTS, "cpu")
    assert cond.embeds.shape == (3, 77, 32) and cond.pooled is None and cond.time_ids is None
    assert cond.unet_kwargs().keys() == {"encoder_hidden_states"}
    pipe = stock_pipeline(tiny_sd_path)
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=1e-6)
    # SD1.5's unconditional embedding is the encoded empty prompt (not zeros).
    torch.testing.assert_close(cond.embeds[1], negative[1], rtol=0, atol=1e-6)
    assert cond.embeds[1].abs().sum() > 0


def test_encode_prompts_sdxl_matches_stock_pipeline(sdxl_parts, tiny_sdxl_path):
    cond = encode_prompts(sdxl_parts, PROMPTS, "cpu")
    # Penultimate hidden states of both encoders (32 + 32), pooled projection of the second, 6 time ids.
    assert cond.embeds.shape == (3, 77, 64) and cond.pooled.shape == (3, 32) and cond.time_ids.shape == (3, 6)
    assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 3
    assert cond.unet_kwargs()["added_cond_kwargs"].keys() == {"text_embeds", "time_ids"}
    # force_zeros_for_empty_prompt: the empty prompt is all zeros, embeddings and pooled alike.
    assert not cond.embeds[1].any() and not cond.pooled[1].any()

    pipe = stock_pipeline(tiny_sdxl_path)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)
    for i in (0, 2):
        torch.testing.assert_close(cond.embeds[i], embeds[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(cond.pooled[i], pooled[i], rtol=0, atol=1e-6)
    # The stock pipeline zeros the unconditional ("") branch the same way.
    torch.testing.assert_close(cond.embeds[1], negative[1], rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled[1], negative_pooled[1], rtol=0, atol=0)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond.time_ids, time_ids.repeat(3, 1))


# --------------------------------------------------------------------------- LoRA
def _trained_lora_unet(path, alpha):
    """The pipeline's UNet with a LoRA adapter whose B matrices are no longer zero, as after training."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    add_lora(unet, rank=4, alpha=alpha, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


# alpha 8 with rank 4 (scale 2) checks that --lora_alpha survives the trip through the diffusers loader.
@pytest.mark.parametrize("name,alpha", [("tiny-sd", 8.0), ("tiny-sdxl", None)])
def test_saved_lora_loads_in_stock_diffusers(name, alpha, request, tmp_path):
    from safetensors.torch import load_file

    path = request.getfixturevalue("tiny_sd_path" if name == "tiny-sd" else "tiny_sdxl_path")
    parts = request.getfixturevalue("sd_parts" if name == "tiny-sd" else "sdxl_parts")
    unet = _trained_lora_unet(path, alpha)
    save_lora(unet, str(tmp_path), is_sdxl=parts.is_sdxl)
    keys = load_file(tmp_path / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("unet.") for k in keys)  # UNet adapters only, diffusers naming
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ours = generate(build_pipeline(parts, unet=unet), 0, size=32)
    pipe = stock_pipeline(path)
    base = generate(pipe, 0, size=32)
    pipe.load_lora_weights(str(tmp_path))
    reloaded = generate(pipe, 0, size=32)
    assert np.abs(reloaded - base).max() > 1e-2, "the LoRA must change the stock pipeline's output"
    np.testing.assert_allclose(reloaded, ours, rtol=0, atol=1e-5)


def test_adapters_disabled_gives_the_base_model_exactly(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    unet = _trained_lora_unet(tiny_sd_path, alpha=None)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = base(x, t, text).sample
        adapted = unet(x, t, text).sample
        with adapters_disabled(unet) as frozen:
            disabled = frozen(x, t, text).sample
        again = unet(x, t, text).sample
    assert (adapted - expected).abs().max() > 1e-3
    assert torch.equal(disabled, expected)
    assert torch.equal(again, adapted), "adapters must be switched back on when the context exits"


# --------------------------------------------------------------------------- checkpoints
def _setup_training(args, path, lora_seed):
    """What a training script does before its loop: model, accelerator, optimizer, scheduler, prepare, hooks."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    if args.use_lora:
        add_lora(unet, rank=4, seed=lora_seed)
    accelerator = make_accelerator(args, "test")
    optimizer = build_optimizer(args, unet.parameters(), args.learning_rate)
    scheduler = build_lr_scheduler(args, optimizer)
    unet, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
    register_checkpoint_hooks(accelerator, is_sdxl=False)
    return accelerator, unet, optimizer, scheduler


def _train_step(accelerator, unet, optimizer, scheduler, step):
    g = torch.Generator().manual_seed(step)  # the batch depends on the step only, as in the scripts
    # 8x8 latents: the UNet takes any even size, and the size does not matter to checkpointing.
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    loss = unet(x, torch.tensor([500]), text).sample.pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _trainable(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer):
    return {(i, k): v.clone() for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=str(k))


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full_unet"])
def test_checkpoint_resume_restores_model_optimizer_scheduler_and_step(use_lora, tiny_sd_path, tmp_path,
                                                                        fresh_accelerate_state):
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path / "run"
    args = parse_common("--output_dir", out, "--lr_scheduler", "linear", "--lr_warmup_steps", 1,
                        "--max_train_steps", 10, "--learning_rate", 1e-3, *([] if use_lora else ["--no-use_lora"]))
    accelerator, unet, optimizer, scheduler = _setup_training(args, tiny_sd_path, lora_seed=0)
    for step in (1, 2):
        _train_step(accelerator, unet, optimizer, scheduler, step)
    ckpt = save_checkpoint(accelerator, str(out), 2)
    saved = (_trainable(unet), _optimizer_tensors(optimizer), scheduler.state_dict())
    _train_step(accelerator, unet, optimizer, scheduler, 3)
    uninterrupted = _trainable(unet)

    files = set(os.listdir(ckpt))
    assert {"optimizer.bin", "scheduler.bin", "training_state.json"} <= files
    assert ("pytorch_lora_weights.safetensors" if use_lora else "unet") in files
    assert "model.safetensors" not in files  # the hook wrote the UNet once, in the diffusers format

    # A new process: fresh state, and a model that differs from the saved one (other LoRA seed / base weights).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    args.resume_from_checkpoint = "latest"
    check_common_args(args)
    accelerator, unet, optimizer, scheduler = _setup_training(args, tiny_sd_path, lora_seed=123)
    with pytest.raises(AssertionError):
        _assert_same(_trainable(unet), saved[0])
    assert resume_from_checkpoint(accelerator, args) == 2
    _assert_same(_trainable(unet), saved[0])
    _assert_same(_optimizer_tensors(optimizer), saved[1])
    assert scheduler.state_dict() == saved[2] and scheduler.get_last_lr() == [pytest.approx(1e-3 * 8 / 9)]
    # ... so the next step is the step an uninterrupted run takes.
    _train_step(accelerator, unet, optimizer, scheduler, 3)
    _assert_same(_trainable(unet), uninterrupted)


@pytest.fixture
def small_accelerator(tmp_path, fresh_accelerate_state):
    """A real Accelerator holding a small prepared model and optimizer (checkpoint bookkeeping only)."""
    args = parse_common("--output_dir", tmp_path)
    accelerator = make_accelerator(args, "test")
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    accelerator.prepare(model, optimizer)
    return accelerator


def test_checkpoints_total_limit_keeps_the_newest(small_accelerator, tmp_path):
    # 9 < 10 < 100 numerically but not as strings: rotation must sort by step.
    for step in (9, 10, 100):
        save_checkpoint(small_accelerator, str(tmp_path), step, total_limit=2)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")) == ["checkpoint-10", "checkpoint-100"]
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-10"), str(tmp_path / "checkpoint-100")]
    save_checkpoint(small_accelerator, str(tmp_path), 101, total_limit=1)
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-101")]


def test_interrupted_save_is_never_taken_for_a_checkpoint(small_accelerator, tmp_path, monkeypatch):
    save_checkpoint(small_accelerator, str(tmp_path), 5)
    # A crash in the middle of accelerate's save_state: files written, then the process dies.
    real_save_state = small_accelerator.save_state

    def crash(output_dir):
        real_save_state(output_dir)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(small_accelerator, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(small_accelerator, str(tmp_path), 6)
    monkeypatch.undo()
    assert os.path.isdir(tmp_path / ".checkpoint-6.partial")
    # A checkpoint-N folder without its state file (copied by hand, half deleted) does not count either.
    (tmp_path / "checkpoint-7").mkdir()
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-5")]
    args = parse_common("--output_dir", tmp_path, "--resume_from_checkpoint", "latest")
    assert resume_from_checkpoint(small_accelerator, args) == 5
    args.resume_from_checkpoint = str(tmp_path / ".checkpoint-6.partial")
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        resume_from_checkpoint(small_accelerator, args)

    # Saving step 6 again replaces the leftovers instead of mixing with them.
    (tmp_path / ".checkpoint-6.partial" / "stale.txt").write_text("from the crashed run")
    save_checkpoint(small_accelerator, str(tmp_path), 6)
    assert not (tmp_path / ".checkpoint-6.partial").exists()
    assert not (tmp_path / "checkpoint-6" / "stale.txt").exists()
    assert list_checkpoints(str(tmp_path))[-1] == str(tmp_path / "checkpoint-6")


# --------------------------------------------------------------------------- metrics
def test_metrics_log_continues_exactly_where_the_resumed_step_is(tmp_path):
    log = MetricsLog(str(tmp_path), start_step=0)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
        assert read_metrics(str(tmp_path))[-1]["step"] == step  # flushed at once, not at close
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.1')  # a line torn by the crash

    log = MetricsLog(str(tmp_path), start_step=3)  # resumed from checkpoint-3: steps 4, 5 and the torn 6 go
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3]
    log.write({"step": 4, "loss": 0.25})
    log.close()
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4]

    MetricsLog(str(tmp_path), start_step=0).close()  # a fresh run starts a fresh file
    assert read_metrics(str(tmp_path)) == []


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", ["missing_absolute", "missing_relative", "missing_bare_name", "not_a_pipeline"])
def test_bad_model_path_is_one_line_naming_the_flag(kind, tmp_path):
    path = {"missing_absolute": str(tmp_path / "no-such-model"), "missing_relative": "./no-such-model",
            "missing_bare_name": "no-such-model", "not_a_pipeline": str(tmp_path)}[kind]
    if kind == "not_a_pipeline":
        (tmp_path / "unet").mkdir()
        (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(UsageError) as err:
        load_pipeline_parts(path)
    message = str(err.value)
    assert "\n" not in message and FLAG in message and repr(path) in message
    assert "expected" in message and "diffusers pipeline" in message
    if kind == "not_a_pipeline":
        assert "model_index.json" in message
    else:
        assert "does not exist" in message


def test_unreachable_hub_id_is_one_line_naming_the_flag():
    with pytest.raises(UsageError) as err:  # the tests run with HF_HUB_OFFLINE=1
        load_pipeline_parts("no-such-org/no-such-model")
    message = str(err.value)
    assert "\n" not in message and FLAG in message and "local pipeline folder" in message


def test_usage_error_exits_2_with_one_line(capsys):
    def main(args):
        load_pipeline_parts("/no/such/model")

    with pytest.raises(SystemExit) as exit_info:
        run_main(main, lambda: None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {FLAG} ") and err.count("\n") == 1


@pytest.mark.parametrize("flags,needle", [
    (["--train_batch_size", 0], "--train_batch_size"),
    (["--gradient_accumulation_steps", 0], "--gradient_accumulation_steps"),
    (["--max_train_steps", 0], "--max_train_steps"),
    (["--lora_rank", 0], "--lora_rank"),
    (["--checkpointing_steps", 0], "--checkpointing_steps"),
    (["--learning_rate", 0], "--learning_rate"),
    (["--learning_rate", -1e-4], "--learning_rate"),
    (["--lr_warmup_steps", -1], "--lr_warmup_steps"),
    (["--max_grad_norm", -1], "--max_grad_norm"),
    (["--use_8bit_adam", "--use_adafactor"], "--use_adafactor"),
    (["--checkpoints_total_limit", 0], "--checkpoints_total_limit"),
    (["--resume_from_checkpoint", "/no/such/checkpoint-5"], "--resume_from_checkpoint"),
])
def test_check_common_args_rejects_bad_values(flags, needle, tmp_path):
    check_common_args(parse_common("--output_dir", tmp_path))  # the defaults are fine
    with pytest.raises(UsageError, match=needle):
        check_common_args(parse_common("--output_dir", tmp_path, *flags))


def test_check_common_args_refuses_to_start_over_an_earlier_run(small_accelerator, tmp_path):
    save_checkpoint(small_accelerator, str(tmp_path), 3)
    with pytest.raises(UsageError, match="--resume_from_checkpoint latest"):
        check_common_args(parse_common("--output_dir", tmp_path))
    check_common_args(parse_common("--output_dir", tmp_path, "--resume_from_checkpoint", "latest"))
