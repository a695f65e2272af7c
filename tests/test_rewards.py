"""Scoring models: tiny random weights in each model's real on-disk format, loaded through the registry.

Tolerance of the differentiable path against the model's own processor (normalised pixel units): the processors
resize uint8 images (PIL, or torchvision on uint8 tensors) in two separable passes and round to uint8 after
each, clipping the bicubic overshoot; ``prepare_pixels`` resizes in float. One uint8 level is 1/255/std ~ 0.015
after normalisation, so we allow a max of 0.05 (about 3 levels, reached only where the image is upsampled) and a
mean of 0.006. Without a resize (an image already at the model's size) the two paths are identical.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_command

from utils import UsageError
from utils.rewards import AESTHETIC_FILE, HPS_FILES, list_rewards, load_reward, parse_reward_spec, pil_to_tensor
from utils.toy.tiny_rewards import (TINY_IMAGE_SIZE, save_tiny_aesthetic, save_tiny_clip, save_tiny_open_clip_checkpoint,
                                    save_tiny_open_clip_hub)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARNED = ["pickscore", "clip", "clip_h14", "aesthetic", "hpsv2", "hpsv2.1"]
WEIGHT_FREE = ["brightness", "saturation", "color_match"]
MAX_PIXEL_DIFF, MEAN_PIXEL_DIFF = 0.05, 0.006


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """name -> local path of a tiny model in that model's real format."""
    root = tmp_path_factory.mktemp("tiny_rewards")
    clip = save_tiny_clip(root / "clip")
    hps_dir = root / "hps"
    save_tiny_open_clip_checkpoint(hps_dir / HPS_FILES["hpsv2"], seed=1)
    v21_file = save_tiny_open_clip_checkpoint(hps_dir / HPS_FILES["hpsv2.1"], seed=2)
    return {
        "pickscore": clip,
        "clip": clip,
        "clip_h14": save_tiny_open_clip_hub(root / "clip_h14", seed=3),  # a folder laid out as the hub repo
        "aesthetic": save_tiny_aesthetic(root / "aesthetic"),
        "hpsv2": str(hps_dir),  # a folder holding the hub file name
        "hpsv2.1": v21_file,  # the checkpoint file itself
    }


@pytest.fixture(scope="session")
def scorers(tiny_paths):
    return {name: load_reward(name, model_name_or_path=tiny_paths.get(name)) for name in LEARNED + WEIGHT_FREE}


def smooth_image(h, w, seed=0):
    """A smooth uint8 RGB image (low-frequency colour blobs, like a photo or a generated sample)."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(1, 3, 5, 5, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    return Image.fromarray((x.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


PROMPTS = ["a red apple on a table", "a photo of a dog", "a blue sky", "an astronaut riding a horse"]


# --------------------------------------------------------------------------- registry and specs
def test_list_rewards():
    # the built-in ones first; then the toy plugin's: toyclip (learned, its weights committed:
    # tests/test_toyworld_models.py) and its pixel judges (images, videos)
    no_gradient = ["jpeg_incompressibility", "jpeg_compressibility", "http"]
    assert list_rewards() == LEARNED + WEIGHT_FREE + no_gradient + ["toyclip", "toyworld_judge", "toyvideo_judge"]


def test_parse_reward_spec():
    assert parse_reward_spec("pickscore") == [("pickscore", 1.0)]
    assert parse_reward_spec("pickscore:1.0, aesthetic:0.05,hpsv2.1:-2") == [
        ("pickscore", 1.0), ("aesthetic", 0.05), ("hpsv2.1", -2.0)
    ]
    for bad in ["pickscore:abc", "pickscore:", "pickscore:nan", "", "clip,clip:2"]:
        with pytest.raises(UsageError):
            parse_reward_spec(bad)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError) as err:
        load_reward("pickscore:1.0,pickscor:0.5")
    message = str(err.value)
    assert "'pickscor'" in message and "\n" not in message
    assert all(name in message for name in list_rewards())


def test_bad_paths_are_usage_errors(tiny_paths, tmp_path):
    with pytest.raises(UsageError, match="single reward"):
        load_reward("clip,brightness", model_name_or_path=tiny_paths["clip"])
    with pytest.raises(UsageError, match="no weights"):
        load_reward("brightness", model_name_or_path=tiny_paths["clip"])
    missing = str(tmp_path / "nowhere")
    for name in LEARNED:
        with pytest.raises(UsageError, match="--reward_model_paths") as err:
            load_reward(name, model_name_or_path=missing)
        assert missing in str(err.value)


def test_missing_weights_name_what_was_looked_for(tmp_path, tiny_paths):
    """Hub ids with an empty cache and HF_HUB_OFFLINE=1: a UsageError naming the hub id / file and the flag.

    In a subprocess, because huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported.
    """
    aesthetic_pth = os.path.join(tiny_paths["aesthetic"], AESTHETIC_FILE)
    script = (
        "import json\nfrom utils.rewards import load_reward\nfrom utils import UsageError\nout = {}\n"
        f"for name, path in [('pickscore', None), ('clip', None), ('clip_h14', None), ('aesthetic', None), ('hpsv2', None), "
        f"('hpsv2.1', None), ('aesthetic-pth', {aesthetic_pth!r})]:\n"
        "    try:\n        load_reward(name.split('-')[0], model_name_or_path=path)\n        out[name] = 'loaded'\n"
        "    except UsageError as err:\n        out[name] = str(err)\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=REPO)
    proc = run_command([sys.executable, "-c", script], 120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {
        "pickscore": "yuvalkirstain/PickScore_v1",
        "clip": "openai/clip-vit-large-patch14",
        "clip_h14": "open_clip_pytorch_model.bin of hub repo 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'",
        "aesthetic": os.path.join(str(tmp_path / "torch"), "hub", "checkpoints", AESTHETIC_FILE),
        "hpsv2": "HPS_v2_compressed.pt",
        "hpsv2.1": "HPS_v2.1_compressed.pt",
        "aesthetic-pth": "openai/clip-vit-large-patch14",  # the MLP is there, the CLIP part is not
    }
    for key, looked_for in expected.items():
        name = key.split("-")[0]
        assert looked_for in out[key], out[key]
        assert f"--reward_model_paths {name}=PATH" in out[key]


def test_unreachable_hub_fails_at_once_with_one_line(tmp_path):
    """HF_HUB_OFFLINE unset and a hub that refuses connections: one request, then the cache only, and one error
    line per scorer naming the hub, the reason and the flag; none of huggingface_hub's retry messages (five
    retries with back-off per file, half a minute per file) on stderr."""
    import socket

    with socket.socket() as s:  # a port nothing listens on: connections to it are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import sys\nfrom utils.rewards import load_reward\nfrom utils import UsageError\n"
        "for name in ['pickscore', 'hpsv2.1']:\n"
        "    try:\n        load_reward(name)\n    except UsageError as err:\n"
        "        print(f'error: {err}', file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=REPO)
    proc = run_command([sys.executable, "-c", script], 120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "Retry" not in proc.stderr, proc.stderr
    for line, name, looked_for in zip(lines, ["pickscore", "hpsv2.1"], ["yuvalkirstain/PickScore_v1", HPS_FILES["hpsv2.1"]]):
        assert line.startswith(f"error: {name}: could not load") and looked_for in line, line
        assert f"the hub at http://127.0.0.1:{port} is unreachable" in line, line
        assert f"--reward_model_paths {name}=PATH" in line, line


# --------------------------------------------------------------------------- loading real formats
def test_weights_come_from_the_files(scorers, tiny_paths):
    """The loaded parameters are the saved ones (not a fresh random init)."""
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tiny_paths["clip"], "model.safetensors"))
    loaded = scorers["clip"].model.state_dict()
    assert saved and set(saved) <= set(loaded)
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())

    mlp_file = torch.load(os.path.join(tiny_paths["aesthetic"], AESTHETIC_FILE), weights_only=True)
    assert sorted(mlp_file) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    mlp = scorers["aesthetic"].mlp.state_dict()
    assert all(torch.equal(mlp[k], v) for k, v in mlp_file.items())

    for name, file in [("hpsv2", os.path.join(tiny_paths["hpsv2"], HPS_FILES["hpsv2"])), ("hpsv2.1", tiny_paths["hpsv2.1"])]:
        checkpoint = torch.load(file, weights_only=True)
        assert set(checkpoint) == {"state_dict"}
        model = scorers[name].model.state_dict()
        assert all(torch.equal(model[k], v) for k, v in checkpoint["state_dict"].items())
    bare = torch.load(os.path.join(tiny_paths["clip_h14"], "open_clip_pytorch_model.bin"), weights_only=True)
    model = scorers["clip_h14"].model.state_dict()
    assert set(bare) == set(model) and all(torch.equal(model[k], v) for k, v in bare.items())


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("size", [32, (32, 24)])
def test_image_prep_matches_open_clip_transforms(mode, size):
    """Every open_clip resize mode, square and not, against open_clip's own validation transform."""
    from open_clip.transform import image_transform

    from utils.rewards import ImagePrep, prepare_pixels

    cfg = dict(size=size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25), resize_mode=mode, interpolation="bicubic", fill_color=0)
    transform = image_transform(size, is_train=False, mean=cfg["mean"], std=cfg["std"], resize_mode=mode)
    prep = ImagePrep.from_open_clip(cfg)
    for hw in [(40, 74), (50, 30), (20, 24)]:
        image = smooth_image(*hw)
        ours, theirs = prepare_pixels(pil_to_tensor(image)[None], prep)[0], transform(image)
        assert ours.shape == theirs.shape
        diff = (ours - theirs).abs()
        assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF, (hw, diff.max(), diff.mean())


def _pooled(output):
    # get_*_features returns a tensor in transformers 4 and an output object (pooler_output) in 5.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_scores_follow_each_models_formula(scorers, tiny_paths):
    """Each score recomputed independently from the library's own API and the model's published formula."""
    images = [smooth_image(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=k) for k in range(len(PROMPTS))]
    with torch.no_grad():
        clip_like = {}
        for name in ("pickscore", "clip", "aesthetic"):
            model, processor = scorers[name].model, scorers[name].processor
            inputs = processor(text=PROMPTS, images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image = F.normalize(_pooled(model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
            text = F.normalize(_pooled(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])), dim=-1)
            clip_like[name] = (model, image, text)
        model, image, text = clip_like["pickscore"]
        expected = {"pickscore": model.logit_scale.exp() * (image * text).sum(-1)}
        _, image, text = clip_like["clip"]
        expected["clip"] = 100 * (image * text).sum(-1)
        # LAION aesthetic v2: Linear layers 0, 2, 4, 6, 7 applied in order, no activations.
        h = clip_like["aesthetic"][1]
        layers = torch.load(os.path.join(tiny_paths["aesthetic"], AESTHETIC_FILE), weights_only=True)
        for i in (0, 2, 4, 6, 7):
            h = h @ layers[f"layers.{i}.weight"].T + layers[f"layers.{i}.bias"]
        expected["aesthetic"] = h[:, 0]
        # HPSv2's img_score.py: diag(image_features @ text_features.T) from the model's dict output.
        import open_clip

        for name in ("hpsv2", "hpsv2.1"):
            model = scorers[name].model
            pixels = torch.stack([scorers[name].preprocess(im) for im in images])
            out = model(pixels, open_clip.get_tokenizer("ViT-H-14")(PROMPTS))
            features = out if isinstance(out, dict) else {"image_features": out[0], "text_features": out[1]}
            expected[name] = torch.diagonal(features["image_features"] @ features["text_features"].T)
    for name, value in expected.items():
        torch.testing.assert_close(torch.tensor(scorers[name].score(images, PROMPTS)), value.float(), rtol=1e-4, atol=1e-5)


def test_clip_h14_is_diffusion_dpos_clip_judge(scorers):
    """clip_h14 computes what Diffusion-DPO's --choice_model clip computes (its utils/clip_utils.py): HPSv2's
    open_clip with light_augmentation=True, whose preprocess_val is ResizeMaxSize (the longest side to the model's
    size, bicubic, then black padding split as pad // 2 before and the rest after), ToTensor, Normalize with OpenAI's
    mean/std; score = diag(image_features @ text_features.T) of the model's dict output (normalised features), no
    factor 100. Written out here with torchvision, not through open_clip's transform.

    Mutations: ``100.0 *`` in OpenClipReward's score, or image_resize_mode="shortest" in load_open_clip (crops
    instead of padding), or train_dpo.py's CHOICE_MODEL_ALIASES without "clip" (tests/test_dpo.py) fail it."""
    import open_clip
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    openai_mean, openai_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def resize_max_size(image, max_size=TINY_IMAGE_SIZE):
        width, height = image.size
        scale = max_size / float(max(height, width))
        new_size = tuple(round(dim * scale) for dim in (height, width))
        image = TF.resize(image, new_size, InterpolationMode.BICUBIC)
        pad_h, pad_w = max_size - new_size[0], max_size - new_size[1]
        return TF.pad(image, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)

    scorer = scorers["clip_h14"]
    images = [smooth_image(*hw, seed=k) for k, hw in enumerate([(20, 40), (50, 30), (64, 64), (33, 90)])]
    pixels = torch.stack([TF.normalize(TF.to_tensor(resize_max_size(im.convert("RGB"))), openai_mean, openai_std)
                          for im in images])
    torch.testing.assert_close(scorer.pixels_from_pil(images), pixels, rtol=0, atol=1e-6)
    with torch.no_grad():
        out = scorer.model(pixels, open_clip.get_tokenizer("ViT-H-14")(PROMPTS))
        features = out if isinstance(out, dict) else {"image_features": out[0], "text_features": out[1]}
        expected = torch.diagonal(features["image_features"] @ features["text_features"].T)
    assert expected.abs().max() <= 1
    torch.testing.assert_close(torch.tensor(scorer.score(images, PROMPTS)), expected.float(), rtol=1e-4, atol=1e-5)


def test_scorers_are_frozen(scorers):
    for name, scorer in scorers.items():
        scorer.train()
        assert not scorer.training, name
        assert all(not p.requires_grad for p in scorer.parameters()), name
        assert scorer.names == [name]


# --------------------------------------------------------------------------- differentiable path == processor path
@pytest.mark.parametrize("name", LEARNED)
# (40, 74): the crop offset is 13.5, where transformers floors and torchvision rounds.
@pytest.mark.parametrize("hw", [(64, 64), (48, 40), (40, 74), (20, 24), (300, 200)])
def test_tensor_preprocessing_matches_processor(scorers, name, hw):
    scorer = scorers[name]
    images = [smooth_image(*hw, seed=k) for k in range(2)]
    ours = scorer.pixels_from_tensor(torch.stack([pil_to_tensor(im) for im in images]))
    theirs = scorer.pixels_from_pil(images)
    assert ours.shape == theirs.shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    diff = (ours - theirs).abs()
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MEAN_PIXEL_DIFF, (diff.max(), diff.mean())


@pytest.mark.parametrize("name", ["hpsv2", "hpsv2.1"])
def test_hps_pads_like_hpsv2(scorers, name):
    """HPSv2 scores with light_augmentation=True: the longest side is resized and the rest padded with black."""
    white = Image.new("RGB", (40, 20), (255, 255, 255))  # w=40, h=20 -> 32x16 inside a 32x32 black square
    mean = torch.tensor(scorers[name].prep.mean).view(3, 1, 1)
    std = torch.tensor(scorers[name].prep.std).view(3, 1, 1)
    for pixels in (scorers[name].pixels_from_pil([white])[0], scorers[name].pixels_from_tensor(pil_to_tensor(white)[None])[0]):
        rows = pixels * std + mean  # back to [0,1]
        assert torch.allclose(rows[:, :8], torch.zeros(3, 8, 32), atol=1e-5)
        assert torch.allclose(rows[:, 8:24], torch.ones(3, 16, 32), atol=1e-5)
        assert torch.allclose(rows[:, 24:], torch.zeros(3, 8, 32), atol=1e-5)


@pytest.mark.parametrize("name", LEARNED + WEIGHT_FREE)
def test_score_equals_call_without_resize(scorers, name):
    """At the model's own size no resize happens, so score() (processor) and __call__ (tensor) must agree
    exactly: same crop, normalisation, tokenisation and scoring."""
    images = [smooth_image(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, seed=k) for k in range(len(PROMPTS))]
    with torch.no_grad():
        called = scorers[name](torch.stack([pil_to_tensor(im) for im in images]), PROMPTS)
    scored = torch.tensor(scorers[name].score(images, PROMPTS))
    torch.testing.assert_close(scored, called, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", LEARNED)
def test_score_close_to_call_after_resize(scorers, name):
    """After a resize the rounding differences move a score by far less than changing the image does."""
    images = [smooth_image(96, 80, seed=k) for k in range(len(PROMPTS))]
    with torch.no_grad():
        called = scorers[name](torch.stack([pil_to_tensor(im) for im in images]), ["a cat"] * len(images))
    scored = torch.tensor(scorers[name].score(images, ["a cat"] * len(images)))
    spread = called.max() - called.min()
    assert spread > 0
    assert (scored - called).abs().max() <= 0.05 * spread


def test_score_batches(scorers):
    scorer = scorers["pickscore"]
    images = [smooth_image(40, 40, seed=k) for k in range(5)]
    prompts = PROMPTS + ["a cat"]
    full = scorer.score(images, prompts)
    scorer.batch_size = 2
    try:
        assert np.allclose(scorer.score(images, prompts), full, atol=1e-5)
    finally:
        del scorer.batch_size


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", LEARNED + WEIGHT_FREE)
def test_gradients_reach_the_pixels(scorers, name):
    images = torch.rand(2, 3, 45, 61, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reward = scorers[name](images, ["a red car", "a green field"])
    assert reward.shape == (2,) and reward.dtype == torch.float32
    reward.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert (images.grad[0].abs().sum() > 0) and (images.grad[1].abs().sum() > 0)
    assert all(p.grad is None for p in scorers[name].parameters())


def test_half_precision_returns_float32(tiny_paths):
    scorer = load_reward("clip", model_name_or_path=tiny_paths["clip"], dtype=torch.bfloat16)
    assert scorer.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    reward = scorer(images, PROMPTS[:2])
    assert reward.dtype == torch.float32
    reward.sum().backward()
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LEARNED)
def test_sensitive_parts_stay_float32_in_half_precision(tiny_paths, scorers, name):
    """The towers take the training dtype; logit_scale and the aesthetic head keep their float32 values,
    also after a later .to(bf16) (the training scripts may move a scorer again)."""
    scorer = load_reward(name, model_name_or_path=tiny_paths[name], dtype=torch.bfloat16).to(torch.bfloat16)
    reference = scorers[name]  # the same weights in float32
    assert torch.equal(scorer.model.logit_scale, reference.model.logit_scale)
    assert scorer.model.logit_scale.dtype == torch.float32
    if name == "aesthetic":
        assert all(p.dtype == torch.float32 for p in scorer.mlp.parameters())
    tower = [p for n, p in scorer.model.named_parameters() if "logit_scale" not in n]
    assert all(p.dtype == torch.bfloat16 for p in tower)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(scorer(images, PROMPTS[:2])).all()


def test_toyclip_in_bf16_is_unbiased_on_matching_images():
    """toyclip (scored as PickScore) on 64 toy-world images with their own captions, bf16 against float32.

    bf16 keeps 8 significant bits: one rounding moves a number by up to 2^-9 = 0.2 %. Rounding
    exp(logit_scale) = 26.03 gives 26.25, a bias of +0.85 % on every score; the towers' roundings point in
    every direction and mostly cancel in the mean over images. So the mean must move by less than 0.3 %
    (it moves by 0.02 % with logit_scale in float32, 0.84 % without).
    """
    from utils.toy import world as toyworld

    rows = list(toyworld.make_rows(64, 5))
    images = torch.from_numpy(np.stack([r["image"] for r in rows])).permute(0, 3, 1, 2).float() / 255
    captions = [r["text"] for r in rows]
    with torch.no_grad():
        full = load_reward("toyclip")(images, captions)
        half = load_reward("toyclip", dtype=torch.bfloat16)(images, captions)
    assert full.mean() > 15  # matching captions: the scores sit far from 0, so a relative bound means something
    assert abs(half.mean() / full.mean() - 1) < 0.003, (half.mean(), full.mean())


# --------------------------------------------------------------------------- weighted sums
def test_weighted_sum_equals_its_parts(scorers, tiny_paths):
    total_scorer = load_reward("pickscore:1.0,aesthetic:0.05,brightness:-2", paths=tiny_paths)
    assert total_scorer.names == ["pickscore", "aesthetic", "brightness"]
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    prompts = PROMPTS[:3]
    total, parts = total_scorer.parts(images, prompts)
    for name in total_scorer.names:
        torch.testing.assert_close(parts[name], scorers[name](images, prompts))
    torch.testing.assert_close(total, parts["pickscore"] + 0.05 * parts["aesthetic"] - 2 * parts["brightness"])
    torch.testing.assert_close(total_scorer(images, prompts), total)

    pil = [smooth_image(40, 48, seed=k) for k in range(3)]
    expected = [p + 0.05 * a - 2 * b for p, a, b in zip(*(scorers[n].score(pil, prompts) for n in total_scorer.names))]
    assert np.allclose(total_scorer.score(pil, prompts), expected, atol=1e-5)


def test_single_name_parts(scorers):
    images = torch.rand(2, 3, 16, 16)
    total, parts = scorers["saturation"].parts(images, PROMPTS[:2])
    assert list(parts) == ["saturation"] and torch.equal(parts["saturation"], total)


# --------------------------------------------------------------------------- weight-free rewards
def test_weight_free_values(scorers):
    black, white = torch.zeros(1, 3, 7, 13), torch.ones(1, 3, 7, 13)
    red = torch.zeros(1, 3, 9, 5)
    red[:, 0] = 1
    assert scorers["brightness"](black, [""]).item() == 0 and scorers["brightness"](white, [""]).item() == pytest.approx(1)
    assert scorers["saturation"](white, [""]).item() == 0 and scorers["saturation"](red, [""]).item() == 1
    match = scorers["color_match"]
    assert match(red, ["a red car"]).item() == pytest.approx(1, abs=1e-5)
    assert match(red, ["a Blue car"]).item() < match(red, ["an orange car"]).item() < 1
    assert match(white, ["white snow, then a red door"]).item() == pytest.approx(1, abs=1e-5)  # first colour wins


def test_color_match_without_colour_word_is_zero_and_flat(scorers):
    images = torch.rand(2, 3, 10, 10, requires_grad=True)
    reward = scorers["color_match"](images, ["a cat", "a reddish thing"])  # "reddish" is not a colour word
    assert torch.equal(reward, torch.zeros(2))
    reward.sum().backward()
    assert torch.equal(images.grad, torch.zeros_like(images))
