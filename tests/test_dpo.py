"""train_dpo.py: the DPO / SFT math on hand-written tensors, the data pipeline on tiny hand-made sets, and
end-to-end runs of the script on the tiny pipelines (CPU, a few steps each)."""
import io
import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch

import train_dpo as T
from utils.denoising import encode_batch, min_snr_weights, noise_pairs, per_sample_error
from utils.pairs import choose_winners, latent_cache_applies, swap_pairs
from conftest import (REPO_ROOT, assert_resumed, deterministic_metrics, free_port, mark_rows_before_resume,
                      run_command, run_main_in_process, run_script)
from utils import UsageError
from utils.data import (GlobalBatchSampler, ImagePairDataset, collate_images, open_image_dataset, require_columns,
                        resize_crop_flip, select_pairs)
from utils.grids import GAP
from utils.toy.synthetic import build_synthetic_preferences, synthetic_preference_rows, write_preference_set
from utils.train.metrics import read_metrics

LOG2 = math.log(2)
METRIC_KEYS = ("loss", "implicit_acc", "model_mse", "ref_mse", "grad_norm", "lr")


def png(color, size=(64, 64)):
    """PNG bytes of a solid RGB colour (0-255), size (height, width)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), tuple(color)).save(buffer, format="PNG")
    return buffer.getvalue()


def pairs_dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


# =========================================================================== the method, on hand-written tensors
def test_dpo_loss_is_log2_when_the_model_equals_the_reference():
    err_w, err_l = torch.tensor([0.3, 1.2, 0.7]), torch.tensor([0.9, 0.4, 0.7])
    loss, metrics = T.dpo_loss(err_w, err_l, err_w.clone(), err_l.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)
    assert metrics["implicit_acc"].item() == 0.5  # every pair is a tie: half each


def test_dpo_loss_and_metrics_match_a_hand_computation():
    mw, ml = torch.tensor([0.50, 0.40, 0.30, 0.20]), torch.tensor([0.52, 0.39, 0.30, 0.25])
    rw, rl = torch.tensor([0.51, 0.40, 0.31, 0.21]), torch.tensor([0.51, 0.40, 0.31, 0.21])
    beta = 100.0
    # inside = -0.5 * beta * ((mw - ml) - (rw - rl)), by hand:
    inside = [-50 * (-0.02 - 0.0), -50 * (0.01 - 0.0), -50 * (0.0 - 0.0), -50 * (-0.05 - 0.0)]  # 1, -0.5, 0, 2.5
    expected = {
        "sigmoid": sum(math.log(1 + math.exp(-x)) for x in inside) / 4,
        "hinge": sum(max(0.0, 1 - x) for x in inside) / 4,
        "ipo": sum((x / beta - 1 / (2 * beta)) ** 2 for x in inside) / 4,
    }
    for loss_type, value in expected.items():
        loss, metrics = T.dpo_loss(mw, ml, rw, rl, beta, loss_type)
        assert loss.item() == pytest.approx(value, rel=1e-5), loss_type
        assert metrics["loss"].item() == pytest.approx(value, rel=1e-5)
        assert metrics["implicit_acc"].item() == pytest.approx((2 + 0.5) / 4)  # two wins, one tie, one loss
        assert metrics["model_mse"].item() == pytest.approx((0.35 + 0.365) / 2, rel=1e-6)
        assert metrics["ref_mse"].item() == pytest.approx((0.3575 + 0.3575) / 2, rel=1e-6)


def test_dpo_loss_falls_when_the_model_prefers_the_winner_more_than_the_reference():
    ref = torch.tensor([0.5, 0.5])
    better, _ = T.dpo_loss(ref - 0.001, ref + 0.001, ref, ref, beta=5000.0)
    worse, _ = T.dpo_loss(ref + 0.001, ref - 0.001, ref, ref, beta=5000.0)
    assert better.item() < LOG2 < worse.item()
    grad = torch.tensor([0.5, 0.5], requires_grad=True)
    T.dpo_loss(grad, ref, ref, ref, beta=10.0)[0].backward()
    assert (grad.grad > 0).all()  # lowering the winner's error lowers the loss


def test_sft_loss_with_and_without_min_snr_weights():
    from diffusers import DDIMScheduler

    err = torch.tensor([1.0, 3.0])
    assert T.sft_loss(err)[0].item() == pytest.approx(2.0)
    assert T.sft_loss(err, torch.tensor([0.5, 1.0]))[0].item() == pytest.approx(1.75)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([10, 900])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    weights = min_snr_weights(scheduler, t, gamma=5.0)
    assert snr[0] > 5 > snr[1]
    assert weights.tolist() == pytest.approx([5.0 / snr[0].item(), 1.0], rel=1e-5)


def test_winner_and_loser_share_one_noise_sample_and_one_timestep():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    winners, losers = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    noise, timesteps = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 500, 999])
    noisy, target, t = noise_pairs(scheduler, torch.cat([winners, losers]), noise, timesteps)
    assert t.tolist() == [5, 500, 999, 5, 500, 999]
    assert torch.equal(target[:3], noise) and torch.equal(target[3:], noise)
    # Same noise: the noisy winner and loser differ by exactly sqrt(alpha_bar_t) (winner - loser).
    scale = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(noisy[:3] - noisy[3:], scale * (winners - losers), atol=1e-5)
    same, _, _ = noise_pairs(scheduler, torch.cat([winners, winners]), noise, timesteps)
    assert torch.equal(same[:3], same[3:])


class RedScorer(torch.nn.Module):
    """A tiny scorer following the registry's interface: the mean red channel."""

    def forward(self, images, prompts):
        return images[:, 0].mean(dim=(1, 2))

    def score(self, pil_images, prompts):
        assert len(pil_images) == len(prompts)
        return [float(np.asarray(image)[..., 0].mean()) for image in pil_images]


def test_choice_model_orders_every_pair_of_a_batch():
    reds = [10, 200, 90, 30, 250]
    rows = [{"jpg_0": png((reds[i], 0, 0)), "jpg_1": png((reds[-1 - i], 0, 0)), "caption": f"p{i}"} for i in range(5)]
    ds = pairs_dataset(rows)
    data_rows, winner_first, _ = select_pairs(ds, None)
    dataset = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", data_rows, winner_first, 32, hflip=False,
                               keep_pil=True)
    batch = collate_images([dataset[(i, 0, i)] for i in range(5)])
    swap = choose_winners(RedScorer(), batch)
    assert swap.tolist() == [True, False, False, True, False]  # the middle pair is a tie: kept as stored
    ordered = swap_pairs(batch, swap)
    red = ordered["pixels"][:, :, 0].mean(dim=(2, 3))  # (B, 2) in [-1, 1]
    assert (red[:, 0] >= red[:, 1]).all() and (red[:, 0] > red[:, 1]).sum() == 4  # every pair ordered
    assert [int(np.asarray(p[0])[0, 0, 0]) for p in ordered["pil"]] == [250, 200, 90, 200, 250]


# =========================================================================== data, on tiny hand-made sets
def test_ties_are_dropped_and_counted_and_a_zero_label_swaps_the_pair():
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    labels = [1.0, 0.0, 0.5, 1.0, 0.5]
    ds = pairs_dataset([{"jpg_0": red, "jpg_1": blue, "label_0": lab, "caption": "c"} for lab in labels])
    rows, winner_first, n_ties = select_pairs(ds, "label_0")
    assert n_ties == 2 and rows.tolist() == [0, 1, 3] and winner_first.tolist() == [True, False, True]
    dataset = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", rows, winner_first, 32, hflip=False)
    first = dataset[(0, 0, 0)]["pixels"][0]
    swapped = dataset[(1, 0, 0)]["pixels"]
    assert first[0].mean() == pytest.approx(1.0) and first[2].mean() == pytest.approx(-1.0)  # red wins
    assert swapped[0][2].mean() == pytest.approx(1.0) and swapped[1][0].mean() == pytest.approx(1.0)  # blue wins


def test_max_train_samples_is_a_seeded_subset():
    """--max_train_samples keeps a random subset of the rows, in their stored order, that the seed fixes: the same seed
    gives the same rows, other seeds other rows, and the subsets are not all the first N rows. Mutation this fails
    under: in utils/data.py select_pairs, the subset taken as the first max_samples rows (`rows[:max_samples]`)."""
    ds = pairs_dataset([{"label_0": float(i % 2)} for i in range(20)])
    subsets = {seed: select_pairs(ds, "label_0", max_samples=5, seed=seed) for seed in range(4)}
    again, winner_first, _ = select_pairs(ds, "label_0", max_samples=5, seed=3)
    assert again.tolist() == subsets[3][0].tolist() and winner_first.tolist() == subsets[3][1].tolist()
    for rows, first, _ in subsets.values():
        assert len(rows) == 5 and rows.tolist() == sorted(set(rows.tolist())) and set(rows.tolist()) <= set(range(20))
        assert first.tolist() == [row % 2 == 1 for row in rows.tolist()]  # each row keeps its own label
    assert len({tuple(rows.tolist()) for rows, _, _ in subsets.values()}) == 4  # four seeds, four subsets


def test_resize_crop_flip_matches_the_original_transform_and_reports_sdxl_sizes():
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(48, 80, 3), dtype=np.uint8))  # h 48, w 80
    original = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR),
                                   transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    pixels, size, crop = resize_crop_flip(image, 32, random_crop=False, flip=False, u_top=0.0, u_left=0.0)
    assert torch.allclose(pixels, original(image), atol=1e-6)
    assert size == (48, 80) and crop == (0, 10)  # resized to 32 x 53: center crop at round(21 / 2) = 10
    flipped, _, crop_flipped = resize_crop_flip(image, 32, random_crop=False, flip=True, u_top=0.0, u_left=0.0)
    assert torch.equal(flipped, pixels.flip(-1)) and crop_flipped == (0, 53 - 32 - 10)
    _, _, random_crop = resize_crop_flip(image, 32, random_crop=True, flip=False, u_top=0.5, u_left=0.999)
    assert random_crop == (0, 21)  # the largest offset in [0, 53 - 32]


def test_random_choices_depend_only_on_the_key():
    rows = synthetic_preference_rows(4, seed=0, sizes=((40, 64),))
    ds = pairs_dataset(rows)
    data_rows, winner_first, _ = select_pairs(ds, "label_0")
    make = lambda: ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", data_rows, winner_first, 32,  # noqa: E731
                                    random_crop=True, proportion_empty_prompts=0.5, seed=7)
    a, b = make(), make()
    items = [a[(i % 4, i, i % 3)] for i in range(12)]
    again = [b[(i % 4, i, i % 3)] for i in range(12)]
    for x, y in zip(items, again):
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["crop"], y["crop"]) and x["caption"] == y["caption"]
    assert {it["caption"] == "" for it in items} == {True, False}  # the empty-prompt draw happens
    assert len({tuple(it["crop"][0].tolist()) for it in items}) > 1  # so does the random crop


def test_two_processes_see_the_global_batch_of_one_and_resume_continues_the_stream():
    one = GlobalBatchSampler(10, per_process=4, seed=3)
    two = [GlobalBatchSampler(10, per_process=2, num_processes=2, process_index=p, seed=3) for p in range(2)]
    streams = [iter(one), *(iter(s) for s in two)]
    batches = [[next(s) for _ in range(7)] for s in streams]  # 7 micro-steps: past the end of epoch 0 (2 batches)
    for k in range(7):
        assert batches[0][k] == batches[1][k] + batches[2][k]  # same rows, same keys
    epoch_0 = [key[0] for b in batches[0][:2] for key in b]
    assert len(set(epoch_0)) == 8  # an epoch never repeats a row
    resumed = iter(GlobalBatchSampler(10, per_process=4, seed=3, start_micro_step=4))
    assert [next(resumed) for _ in range(3)] == batches[0][4:]
    with pytest.raises(UsageError, match="fewer than one global batch"):
        GlobalBatchSampler(3, per_process=2, num_processes=2)


def test_sft_never_reads_the_loser_and_a_broken_image_names_its_row():
    ds = pairs_dataset([{"jpg_0": png((255, 0, 0)), "jpg_1": b"not an image", "label_0": 1.0, "caption": "c"},
                        {"jpg_0": b"also broken", "jpg_1": png((0, 255, 0)), "label_0": 0.0, "caption": "c"}])
    rows, winner_first, _ = select_pairs(ds, "label_0")
    winners = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", rows, winner_first, 32, hflip=False, decode=1)
    assert winners[(0, 0, 0)]["pixels"].shape == (1, 3, 32, 32)
    assert winners[(1, 0, 0)]["pixels"][0, 1].mean() == pytest.approx(1.0)  # the green winner of row 1
    both = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", rows, winner_first, 32, hflip=False)
    assert both.row_problem(1).startswith("row 1: column 'jpg_0' is not a readable image")
    with pytest.raises(UsageError, match=r"^no row of the data set is readable; row 1: column 'jpg_0' is not a readable"):
        both[(1, 0, 0)]  # both rows are broken: nothing can stand in (one broken row is replaced: test_reliability)


def test_image_caption_data_for_sft(tmp_path):
    ds = pairs_dataset([{"image": png((0, 0, 255), (40, 50)), "text": ["a", "b"]}])
    require_columns(ds, {"--image_column": "image", "--caption_column": "text"}, "--dataset_name x")
    with pytest.raises(UsageError, match=r"has no column 'caption' \(found: image, text\); set --caption_column"):
        require_columns(ds, {"--caption_column": "caption"}, "--dataset_name x")
    rows, winner_first, _ = select_pairs(ds, None)
    item = ImagePairDataset(ds, ["image"], "text", rows, winner_first, 32)[(0, 0, 0)]
    assert item["pixels"].shape == (1, 3, 32, 32) and item["original_size"].tolist() == [[40, 50]]
    assert item["caption"] in ("a", "b")


def test_datasets_folder_parquet_and_jsonl_give_the_same_pairs(tmp_path):
    rows = synthetic_preference_rows(3, seed=1)
    paths = [write_preference_set(rows, str(tmp_path / fmt), fmt) for fmt in ("datasets", "parquet", "jsonl")]
    items = []
    for path in paths:
        ds, base_dir, _ = open_image_dataset(path)
        data_rows, winner_first, _ = select_pairs(ds, "label_0")
        dataset = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", data_rows, winner_first, 32, base_dir=base_dir)
        items.append(dataset[(2, 5, 1)])
    for other in items[1:]:
        assert torch.equal(items[0]["pixels"], other["pixels"]) and items[0]["prompt"] == other["prompt"]
    with pytest.raises(UsageError, match="no such file"):
        open_image_dataset(str(tmp_path / "missing.parquet"))


def test_sdxl_time_ids_come_from_each_images_own_size_and_crop(tiny_sdxl_path):
    from utils.models import freeze_frozen_parts, load_pipeline_parts

    parts = load_pipeline_parts(tiny_sdxl_path)
    freeze_frozen_parts(parts, "cpu", torch.float32)
    batch = {"pixels": torch.zeros(2, 2, 3, 32, 32), "caption": ["a", "b"],
             "original_size": torch.tensor([[[40, 64], [64, 40]], [[32, 32], [100, 50]]]),
             "crop": torch.tensor([[[4, 0], [0, 4]], [[0, 0], [9, 1]]])}
    latents, cond = encode_batch(parts, batch, torch.zeros(2, 2, 4, 16, 16), 2, 32)
    assert latents.shape == (4, 4, 16, 16) and cond.embeds.shape[0] == 4
    # rows: winner of pair 0, winner of pair 1, loser of pair 0, loser of pair 1
    assert cond.time_ids.tolist() == [[40, 64, 4, 0, 32, 32], [32, 32, 0, 0, 32, 32],
                                      [64, 40, 0, 4, 32, 32], [100, 50, 9, 1, 32, 32]]
    assert torch.equal(cond.embeds[:2], cond.embeds[2:]) and torch.equal(cond.pooled[:2], cond.pooled[2:])


# =========================================================================== arguments
@pytest.mark.parametrize("flags,needle", [
    (["--beta_dpo", "0"], "--beta_dpo must be > 0"),
    (["--beta_dpo", "-5"], "--beta_dpo must be > 0"),
    (["--choice_model", "nope"], "--choice_model 'nope'"),
    (["--proportion_empty_prompts", "1.5"], "--proportion_empty_prompts"),
    (["--image_column", "image"], "needs --sft"),
    (["--snr_gamma", "5"], "--sft only"),
    (["--resolution", "30"], "--resolution"),
])
def test_check_args_rejects_bad_values(flags, needle, tmp_path):
    base = ["--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", "x", "--output_dir", str(tmp_path)]
    T.parse_args(base)  # the defaults are fine
    with pytest.raises(UsageError, match=needle):
        T.parse_args(base + flags)


def test_choice_model_takes_the_original_scripts_names(tmp_path):
    """The Diffusion-DPO train.py's names mean its scorers: its 'clip' (utils/clip_utils.py, the LAION ViT-H-14 cosine)
    is clip_h14, not the OpenAI ViT-L/14 CLIP score of --reward_model clip.
    Mutation: CHOICE_MODEL_ALIASES without "clip" fails it."""
    base = ["--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", "x", "--output_dir", str(tmp_path)]
    assert T.parse_args(base + ["--choice_model", "aes"]).choice_model == "aesthetic"
    assert T.parse_args(base + ["--choice_model", "hps"]).choice_model == "hpsv2"
    assert T.parse_args(base + ["--choice_model", "clip"]).choice_model == "clip_h14"
    assert T.parse_args(base + ["--choice_model", "brightness"]).choice_model == "brightness"


# =========================================================================== end to end: the script on the tiny pipelines
FAST = ["--resolution", "32", "--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none",
        "--lr_warmup_steps", "0"]


def dpo_flags(base, dataset, output_dir, *extra):
    return ["train_dpo.py", "--pretrained_model_name_or_path", base, "--dataset_name", dataset,
            "--output_dir", output_dir, *FAST, *[str(e) for e in extra]]


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    """16 training pairs (a quarter of them ties, two image sizes) and 16 held-out pairs, brighter = better."""
    root = tmp_path_factory.mktemp("prefs")
    rows = synthetic_preference_rows(16, seed=0, tie_fraction=0.25, sizes=((64, 64), (48, 80)))
    train = write_preference_set(rows, str(root / "train"))
    held_out = build_synthetic_preferences(str(root / "held_out"), num_pairs=16, seed=1)
    return {"train": train, "held_out": held_out, "ties": sum(r["label_0"] == 0.5 for r in rows), "root": root}


LORA_RUN = ["--use_lora", "--lora_rank", "4", "--learning_rate", "1e-3", "--train_batch_size", "2",
            "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def lora_run(pref_data, tiny_sd_path, tmp_path_factory):
    """LoRA DPO on tiny-sd: 3 steps of 2 pairs, a checkpoint at step 2 (VAE posterior sampled)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = run_script(dpo_flags(tiny_sd_path, pref_data["train"], out, *LORA_RUN, "--max_train_steps", 3,
                                "--validation_steps", 3), launch=True)
    return {"out": out, "log": proc.stdout + proc.stderr, "metrics": read_metrics(str(out))}


def test_lora_first_loss_is_log2_and_every_step_is_logged(lora_run):
    metrics = lora_run["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(set(METRIC_KEYS) <= set(m) for m in metrics)
    assert metrics[0]["loss"] == pytest.approx(LOG2, abs=1e-4)
    assert metrics[0]["implicit_acc"] == 0.5 and metrics[0]["model_mse"] == metrics[0]["ref_mse"]
    assert metrics[-1]["loss"] != pytest.approx(LOG2, abs=1e-4)  # the adapter did train
    # grids at the multiples of --validation_steps and the end only: the base row of each is the step-0 model
    assert sorted(p.name for p in (lora_run["out"] / "samples").glob("*.png")) == ["validation-step-000003.png"]
    info = json.loads((lora_run["out"] / "samples" / "validation-step-000003.json").read_text())
    assert info["rows"] == ["base", "trained"] and len(info["prompts"]) == 2
    grid = info["grid"]  # no --choice_model: no scores, so no caption band under the images
    assert (grid["rows"], grid["cols"]) == (2, 2) and grid["pitch_y"] == grid["cell_height"] + GAP


def test_ties_are_dropped_and_the_count_is_printed(lora_run, pref_data):
    assert pref_data["ties"] > 0
    assert f"dropped {pref_data['ties']} of 16 pairs with a tie (label_0 = 0.5)" in lora_run["log"]


def test_lora_output_reloads_in_stock_diffusers(lora_run, tiny_sd_path):
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(tiny_sd_path)
    tuned = DiffusionPipeline.from_pretrained(tiny_sd_path)
    tuned.load_lora_weights(str(lora_run["out"]))
    x, t, text = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 500, torch.randn(1, 77, 32)
    with torch.no_grad():
        assert not torch.allclose(base.unet(x, t, text).sample, tuned.unet(x, t, text).sample, atol=1e-6)
    assert (lora_run["out"] / "checkpoint-2" / "pytorch_lora_weights.safetensors").exists()


def test_resume_continues_metrics_exactly(lora_run, pref_data, tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(lora_run["out"], out)  # the run holds checkpoint-2: step 3 is run again from it
    mark_rows_before_resume(out)
    # in this process (the run's log: conftest.run_main_in_process); lora_run is the run through accelerate launch
    log = main_in_process(dpo_flags(tiny_sd_path, pref_data["train"], out, *LORA_RUN, "--max_train_steps", 3,
                                    "--resume_from_checkpoint", "latest"))
    # continued from checkpoint-2 (conftest.assert_resumed says the mutation this fails under), equal (==) after it
    assert deterministic_metrics(assert_resumed(out, log, 2)) == deterministic_metrics(lora_run["metrics"])


def test_two_processes_give_the_numbers_of_one_with_the_same_global_batch(lora_run, pref_data, tiny_sd_path, tmp_path):
    # accelerate launch runs several CPU processes only through torchrun (--multi_gpu) with ACCELERATE_USE_CPU set:
    # its --cpu flag alone starts one process. gloo backend.
    out = tmp_path / "run"
    flags = dpo_flags(tiny_sd_path, pref_data["train"], out, *LORA_RUN, "--max_train_steps", 2)
    flags[flags.index("--train_batch_size") + 1] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *flags]
    env = {**__import__("os").environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    proc = run_command(cmd, 600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "processes 2 x batch 1" in proc.stderr
    two, one = read_metrics(str(out)), lora_run["metrics"][:2]
    # Step 1: the same data, noise and timesteps, the model equal to the reference: bit-equal errors cancel, the
    # loss is log 2 in both. Step 2: the same (all-reduced) update, but the UNet now runs on a batch of 1 instead of 2,
    # with other float32 convolution blocking and sum order: each per-sample error carries a relative rounding
    # difference of up to ~2e-6 (16 ulps). DPO multiplies a difference of four such errors by 0.5 * beta (2500), so
    # |d inside| <= 0.5 * beta * 4 * 2e-6 * mse, and the loss (slope of logsigmoid <= 1) and the gradient norm
    # (proportional to sigmoid(-inside)) move by at most that much. The errors themselves are compared at 1e-5.
    assert len(two) == len(one) == 2
    assert two[0]["loss"] == one[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    for a, b in zip(two, one):
        inside_bound = 0.5 * 5000 * 4 * 2e-6 * max(b["model_mse"], b["ref_mse"])
        for key in ("model_mse", "ref_mse"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["step"])
        assert a["loss"] == pytest.approx(b["loss"], abs=inside_bound), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=inside_bound + 1e-5), a["step"]
    assert two[0]["implicit_acc"] == one[0]["implicit_acc"] == 0.5  # at step 2 a pair with |inside| < the bound may flip


@pytest.fixture(scope="module")
def full_run(pref_data, tiny_sd_path, tmp_path_factory):
    """Full-UNet DPO, AI feedback: pairs from a jsonl file without labels, ordered by the brightness scorer. In this
    process, its log kept by conftest.run_main_in_process (lora_run is the run through accelerate launch)."""
    root = tmp_path_factory.mktemp("full")
    rows = [{k: v for k, v in r.items() if k != "label_0"} for r in synthetic_preference_rows(6, seed=2)]
    data = write_preference_set(rows, str(root / "data"), "jsonl")
    out = root / "run"
    log = main_in_process(dpo_flags(tiny_sd_path, data, out, "--choice_model", "brightness", "--learning_rate", "1e-4",
                                    "--train_batch_size", 3, "--max_train_steps", 1, "--validation_steps", 1))
    return {"out": out, "log": log, "metrics": read_metrics(str(out))}


def test_full_unet_first_loss_is_log2_and_reloads_in_stock_diffusers(full_run, tiny_sd_path):
    from diffusers import UNet2DConditionModel

    assert full_run["metrics"][0]["loss"] == pytest.approx(LOG2, abs=1e-4)
    trained = UNet2DConditionModel.from_pretrained(str(full_run["out"]), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    changed = [n for (n, p), q in zip(trained.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert len(changed) > 0.5 * len(list(base.parameters()))  # the whole UNet trains, not an adapter
    assert not (full_run["out"] / "pytorch_lora_weights.safetensors").exists()


def test_choice_model_runs_without_labels_and_scores_validation_images(full_run):
    assert "with a tie" not in full_run["log"]  # no label column is read
    info = json.loads((full_run["out"] / "samples" / "validation-step-000001.json").read_text())
    assert set(info["scores"]) == {"base", "trained"} and len(info["scores"]["trained"]) == 2
    grid = info["grid"]  # the scores are drawn: a caption line under each image
    assert grid["pitch_y"] > grid["cell_height"] + GAP


def held_out_dpo_metrics(base_path, trained_unet, data, beta, resolution=32, draws=4):
    """Implicit accuracy and DPO loss of `trained_unet` against the base UNet on held-out pairs, through the
    script's own encode / noise / error functions (posterior mode, seeded noise and timesteps)."""
    from utils.models import freeze_frozen_parts, load_pipeline_parts

    parts = load_pipeline_parts(base_path)
    freeze_frozen_parts(parts, "cpu", torch.float32)
    ds, base_dir, _ = open_image_dataset(data)
    rows, winner_first, _ = select_pairs(ds, "label_0")
    dataset = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", rows, winner_first, resolution, hflip=False)
    batch = collate_images([dataset[(i, 0, i)] for i in range(len(dataset))])
    n, latent = len(dataset), (4, resolution // 2, resolution // 2)
    g = torch.Generator().manual_seed(1234)
    accs, losses = [], []
    with torch.no_grad():
        latents, cond = encode_batch(parts, batch, torch.zeros(n, 2, *latent), 2, resolution)
        for _ in range(draws):
            noisy, target, t = noise_pairs(parts.scheduler, latents, torch.randn(n, *latent, generator=g),
                                             torch.randint(0, 1000, (n,), generator=g))
            err = per_sample_error(trained_unet(noisy, t, **cond.unet_kwargs()).sample, target)
            ref = per_sample_error(parts.unet(noisy, t, **cond.unet_kwargs()).sample, target)
            loss, metrics = T.dpo_loss(*err.chunk(2), *ref.chunk(2), beta)
            accs.append(metrics["implicit_acc"].item())
            losses.append(loss.item())
    return sum(accs) / draws, sum(losses) / draws


def test_training_on_synthetic_preferences_generalises_to_held_out_pairs(pref_data, tiny_sd_path, tmp_path):
    from diffusers import UNet2DConditionModel

    train = build_synthetic_preferences(str(tmp_path / "train"), num_pairs=32, seed=3)
    out = tmp_path / "run"
    main_in_process(dpo_flags(tiny_sd_path, train, out, "--learning_rate", "1e-4", "--beta_dpo", 500,
                              "--train_batch_size", 4, "--max_train_steps", 10, "--validation_steps", 100))
    losses = [m["loss"] for m in read_metrics(str(out))]
    assert losses[0] == pytest.approx(LOG2, abs=1e-4) and sum(losses[-3:]) / 3 < 0.5 * LOG2
    trained = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").eval()
    acc, loss = held_out_dpo_metrics(tiny_sd_path, trained, pref_data["held_out"], beta=500)
    assert acc > 0.75 and loss < 0.5 * LOG2


def test_sft_trains_only_on_winners(tiny_sd_path, tmp_path):
    # Every loser is unreadable: SFT never decodes it, DPO on the same set fails naming the row.
    winners = synthetic_preference_rows(4, seed=4)
    rows = [{**r, ("jpg_1" if r["label_0"] == 1 else "jpg_0"): b"broken", "label_0": r["label_0"]} for r in winners]
    data = write_preference_set(rows, str(tmp_path / "data"))
    out = tmp_path / "sft"
    main_in_process(dpo_flags(tiny_sd_path, data, out, "--sft", "--use_lora", "--learning_rate", "1e-3",
                              "--train_batch_size", 2, "--max_train_steps", 2))
    metrics = read_metrics(str(out))
    assert [m["step"] for m in metrics] == [1, 2] and "implicit_acc" not in metrics[0] and metrics[0]["loss"] > 0
    assert (out / "pytorch_lora_weights.safetensors").exists()
    proc = run_script(dpo_flags(tiny_sd_path, data, tmp_path / "dpo", "--train_batch_size", 2, "--max_train_steps", 1,
                                "--dataloader_num_workers", 1), expect_ok=False)
    # Bad rows are skipped, but here every pair has an unreadable image: one line naming the first, no traceback.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no row of the data set is readable; row ") and "is not a readable image" in last


def test_sft_on_an_image_folder_from_an_initial_unet(tiny_sd_path, tmp_path):
    """Plain text-to-image fine-tuning: --train_data_dir (imagefolder + metadata.jsonl), min-SNR weights, offset
    noise, starting from another UNet (--unet_init, a folder holding unet/ as full-UNet runs write it)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "images"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)]):
            (folder / f"{i}.png").write_bytes(png(color, (40 + 8 * i, 48)))
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a plain colour {i}"}) + "\n")
    init = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    with torch.no_grad():
        init.conv_in.weight += 1.0  # far from the pipeline's UNet
    init.save_pretrained(tmp_path / "init" / "unet")
    out = tmp_path / "run"
    flags = dpo_flags(tiny_sd_path, "unused", out, "--sft", "--image_column", "image", "--caption_column", "text",
                      "--snr_gamma", 5, "--noise_offset", 0.1, "--unet_init", tmp_path / "init",
                      "--learning_rate", "1e-4", "--train_batch_size", 2, "--max_train_steps", 2)
    flags[flags.index("--dataset_name"):flags.index("--dataset_name") + 2] = ["--train_data_dir", str(folder)]
    main_in_process(flags)
    metrics = read_metrics(str(out))
    assert [m["step"] for m in metrics] == [1, 2] and set(metrics[0]) >= {"loss", "lr", "step"}
    assert "implicit_acc" not in metrics[0]
    trained = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").conv_in.weight
    assert 0 < (trained - init.conv_in.weight).abs().max() < 0.01  # trained, starting from --unet_init


def test_tiny_sdxl_trains_with_cached_latents_and_reloads(pref_data, tiny_sdxl_path, tmp_path):
    """SDXL with --cache_latents (every image through the VAE once, before training) gives the numbers of the run that
    encodes each batch as it comes: without augmentation to draw (centre crop, --no_hflip) and without empty prompts
    (the cached rows draw theirs from other numbers of the same seed) both train on the same posteriors, posterior
    draws, noise and timesteps, so every metric agrees to float32 rounding (the VAE encodes the images in other
    batches). The output reloads in stock diffusers' SDXL pipeline. Mutation this fails under: in
    utils/pairs.py build_latent_cache, the cached std dropped (`stds.append(std.cpu() * 0)`: the posterior's mode
    instead of a sample)."""
    from diffusers import DiffusionPipeline

    out, uncached = tmp_path / "run", tmp_path / "uncached"
    flags = ["--sdxl", "--use_lora", "--learning_rate", "1e-3", "--train_batch_size", 2, "--max_train_steps", 2,
             "--no_hflip", "--proportion_empty_prompts", 0]
    main_in_process(dpo_flags(tiny_sdxl_path, pref_data["train"], out, *flags, "--cache_latents"))
    main_in_process(dpo_flags(tiny_sdxl_path, pref_data["train"], uncached, *flags))
    cached, plain = read_metrics(str(out)), read_metrics(str(uncached))
    assert cached[0]["loss"] == pytest.approx(LOG2, abs=1e-4) and len(cached) == len(plain) == 2
    for a, b in zip(cached, plain):
        for key in ("loss", "model_mse", "ref_mse", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a["step"], a[key], b[key])
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_lora_weights(str(out))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


@pytest.mark.parametrize("case", ["missing_column", "beta", "choice_model"])
def test_bad_input_is_one_line_with_exit_code_2(case, pref_data, tiny_sd_path, tmp_path):
    data, extra = pref_data["train"], []
    if case == "missing_column":
        data = str(tmp_path / "no_labels")
        pairs_dataset([{"jpg_0": png((1, 2, 3)), "jpg_1": png((3, 2, 1)), "caption": "c"}]).save_to_disk(data)
    extra = {"missing_column": [], "beta": ["--beta_dpo", "0"], "choice_model": ["--choice_model", "nope"]}[case]
    proc = run_script(dpo_flags(tiny_sd_path, data, tmp_path / "run", *extra), expect_ok=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    needle = {"missing_column": "has no column 'label_0' (found: jpg_0, jpg_1, caption); set --label_column",
              "beta": "--beta_dpo must be > 0", "choice_model": "--choice_model 'nope'"}[case]
    assert needle in proc.stderr


# --------------------------------------------------------------------------- speed levers: the same numbers
# 12 pairs (the 4 ties dropped), 2 per step: 6 steps an epoch, so 9 steps see most images a second time and the
# posterior cache is used. Baseline: images decoded in the training process, the loss checked on the host every
# micro-step, no cache, eager UNet.
LEVERS_RUN = ["--use_lora", "--lora_rank", "4", "--learning_rate", "1e-3", "--train_batch_size", "2",
              "--max_train_steps", 9, "--checkpointing_steps", 1000]
BASELINE = ["--dataloader_num_workers", 0, "--no-defer_loss_check", "--latent_cache", "off"]


def main_in_process(flags):
    """train_dpo.main in this process (so that monkeypatches apply, and without a subprocess's ~15 s of imports), on
    dpo_flags(...) without the script name: conftest.run_main_in_process (a fresh accelerate state, the stop-signal
    handlers that main() installs put back afterwards). Returns the run's log (INFO and above)."""
    assert flags[0] == "train_dpo.py"
    return run_main_in_process(T, flags[1:])


@pytest.fixture(scope="module")
def baseline_run(pref_data, tiny_sd_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("levers") / "baseline"
    main_in_process(dpo_flags(tiny_sd_path, pref_data["train"], out, *LEVERS_RUN, *BASELINE))
    return deterministic_metrics(read_metrics(str(out)))


@pytest.mark.parametrize("lever", [
    ["--dataloader_num_workers", 2],  # items are a function of (seed, step, row): workers change nothing
    ["--defer_loss_check"],  # the same update decisions, read once per step
    ["--latent_cache", "on", "--dataloader_num_workers", 2],  # cached moments, and workers told to skip decoding
], ids=["workers", "deferred_check", "latent_cache"])
def test_speed_levers_leave_the_numbers_unchanged(lever, baseline_run, pref_data, tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    flags = dpo_flags(tiny_sd_path, pref_data["train"], out, *LEVERS_RUN, *BASELINE, *lever)
    log = main_in_process(flags)  # in this process, as the baseline
    if "--latent_cache" not in lever:
        assert deterministic_metrics(read_metrics(str(out))) == baseline_run  # bit for bit
        return
    metrics = deterministic_metrics(read_metrics(str(out)))
    assert "VAE posterior cache on" in log  # the run's log (conftest.run_main_in_process) says that the cache is on
    # the cache encodes one image per VAE call, the baseline a whole batch: float32 summation order, ~1e-7 relative
    # in the latents; beta 5000 scales the error difference inside the sigmoid, so the loss agrees to ~1e-4
    for ours, plain in zip(metrics, baseline_run):
        assert ours["step"] == plain["step"] and ours["implicit_acc"] == plain["implicit_acc"]
        assert ours["loss"] == pytest.approx(plain["loss"], abs=1e-3)
        for key in ("model_mse", "ref_mse", "grad_norm"):
            assert ours[key] == pytest.approx(plain[key], rel=1e-3), key


def test_latent_cache_auto_is_on_only_past_one_epoch(pref_data, tiny_sd_path, tmp_path):
    shape, dtype = (4, 4, 4), torch.float32

    def applies(mode, batches_drawn, num_rows=12, global_batch=2):
        return latent_cache_applies(mode, num_rows, 2, 2, shape, dtype, batches_drawn, global_batch)

    assert applies("auto", batches_drawn=9)  # 9 batches of 2 pairs > the 6 batches of an epoch of 12 pairs
    assert not applies("auto", batches_drawn=6)  # exactly one epoch: nothing to reuse
    assert not applies("auto", batches_drawn=9, num_rows=2**30)  # the posteriors would not fit the memory budget
    assert applies("on", batches_drawn=1) and not applies("off", batches_drawn=100)
    # a new crop every draw (--random_crop), a scorer reading every image (--choice_model) or latents cached up front
    # (--cache_latents) keep it off whatever the mode: train_dpo.make_loader decides that before asking


def test_compiled_training_unet_gives_the_same_numbers(baseline_run, pref_data, tiny_sd_path, tmp_path, monkeypatch,
                                                       fresh_accelerate_state):
    """--compile_unet: dynamo captures the LoRA UNet's training forward (backend "eager" here: the capture, guards
    and graph breaks are what is tested; inductor's kernels are measured on the GPU, bench/e2e.py)."""
    from utils.speed import compile_training_unet

    monkeypatch.setattr(T, "compile_training_unet", lambda unet, mode: compile_training_unet(unet, mode, "eager"))
    main_in_process(dpo_flags(tiny_sd_path, pref_data["train"], tmp_path, *LEVERS_RUN, *BASELINE,
                              "--compile_unet", "default"))
    compiled = deterministic_metrics(read_metrics(str(tmp_path)))
    assert [m["step"] for m in compiled] == list(range(1, 10))
    for ours, eager in zip(compiled, baseline_run):  # float32; the same kernels, so equal but for the reduction order
        for key in ("loss", "model_mse", "ref_mse", "grad_norm"):
            assert ours[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-7), key


def test_posterior_cache_skips_decoding_and_encoding_of_images_seen_before(pref_data):
    from utils.data import PosteriorCache, SkipCachedSampler

    ds, base_dir, _ = open_image_dataset(pref_data["train"])
    rows, winner_first, _ = select_pairs(ds, "label_0")
    dataset = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", rows, winner_first, resolution=16, seed=0,
                               base_dir=base_dir)
    cache, encoded = PosteriorCache(torch.float32), []

    def encode(pixels):  # (F, 1, 3, R, R) -> a 1x1x1 "posterior" per image: its mean pixel
        encoded.append(len(pixels))
        mean = pixels.mean(dim=(2, 3, 4))[:, :, None, None, None]
        return mean, mean + 1

    keys = iter(SkipCachedSampler([[(0, 0, 0), (3, 0, 1)], [(0, 0, 0), (3, 0, 1)]], dataset, cache))
    first = collate_images([dataset[k] for k in next(keys)])
    mean, std, filled = cache.moments(encode, first, 2, "cpu")
    again = collate_images([dataset[k] for k in next(keys)])  # the same draws: every image is cached now
    assert again["skipped"].all() and not again["pixels"].any() and not again["original_size"].any()
    mean2, std2, filled2 = cache.moments(encode, again, 2, "cpu")
    assert encoded == [1] * 4  # one encoder call per image of the first batch (2 pairs), none for the second
    assert torch.equal(mean, mean2) and torch.equal(std, std2)
    assert torch.equal(filled["original_size"], filled2["original_size"]) and torch.equal(filled["crop"], filled2["crop"])
