"""Video SFT / DPO on pre-encoded data (Wan 2.1, tiny-wan): `python -m utils.preencode` on small mp4 files written here
with PyAV (manifest, bad videos, resume, the stored numbers against the VAE and UMT5 run by hand; the same clips as
webdataset .tar shards give the same shards as the captions file), then train_dpo.py on the folder (the first SFT
loss against the flow-matching loss computed by hand, the LoRA loading into WanPipeline, DPO on pairs, a manifest of
another model refused).

Two processes of the pre-encoder are not run here: each takes every n-th shard by the same code path, and starting
them costs more than this file's whole budget on a 2-core machine."""
import io
import json
import math
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from conftest import frozen_tiny_parts, run_main_in_process, write_jsonl, write_square_clip
from utils import UsageError
from utils.data import BadRow
from utils.toy.tiny import TINY_WAN_FRAMES, TINY_WAN_RESOLUTION

av = pytest.importorskip("av")

N_CLIPS, CLIP_FRAMES = 3, 6
SHARD_ROWS = 2


def _preencode(*flags):
    from utils.preencode import main, parse_args

    main(parse_args([str(f) for f in ("--pretrained_model_name_or_path", "tiny-wan", "--num_frames", TINY_WAN_FRAMES,
                                      "--resolution", TINY_WAN_RESOLUTION, "--dtype", "float32", *flags)]))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """3 clips, a file that is no video, captions.jsonl (the folder layout) and pairs.jsonl (one pair a tie)."""
    folder = tmp_path_factory.mktemp("videos")
    for k in range(N_CLIPS):
        write_square_clip(folder / f"clip{k}.mp4", TINY_WAN_RESOLUTION, TINY_WAN_RESOLUTION, CLIP_FRAMES, 0, k)
    (folder / "broken.mp4").write_bytes(b"not a video")
    write_jsonl(folder / "captions.jsonl", [{"file": f"clip{k}.mp4", "caption": f"a square moving right {k}"}
                                             for k in range(N_CLIPS)] + [{"file": "broken.mp4", "caption": "broken"}])
    write_jsonl(folder / "pairs.jsonl", [
        {"video_0": "clip0.mp4", "video_1": "clip1.mp4", "label_0": 1.0, "caption": "a square"},
        {"video_0": "clip1.mp4", "video_1": "clip2.mp4", "label_0": 0.0, "caption": "a moving square"},
        {"video_0": "clip2.mp4", "video_1": "clip0.mp4", "label_0": 0.5, "caption": "a tie"}])
    return folder


@pytest.fixture(scope="module")
def encoded(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoded")
    _preencode("--dataset_name", videos / "captions.jsonl", "--rows_per_shard", SHARD_ROWS, "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def parts():
    return frozen_tiny_parts("tiny-wan")


def _shard(folder, k):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, f"shard-{k:05d}.safetensors"))


# --------------------------------------------------------------------------- pre-encoding
def test_manifest_names_model_frames_size_and_the_bad_video(encoded, parts):
    from utils.preencoded import module_fingerprint

    with open(encoded / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["family"] == "wan" and manifest["model"] == "tiny-wan" and manifest["pairs"] is False
    assert (manifest["num_frames"], manifest["frame_stride"], manifest["height"], manifest["width"]) == (5, 1, 32, 32)
    assert manifest["latent_shape"] == list(parts.latent_shape(TINY_WAN_RESOLUTION, TINY_WAN_FRAMES)) == [16, 2, 4, 4]
    assert manifest["vae"]["fingerprint"] == module_fingerprint(parts.vae) and manifest["dtype"] == "float32"
    assert manifest["num_rows"] == N_CLIPS and [s["rows"] for s in manifest["shards"]] == [2, 1]
    [(row, reason)] = manifest["bad_rows"]
    assert row == N_CLIPS and "unreadable video" in reason and "broken.mp4" in reason
    assert (encoded / "empty_prompt.safetensors").exists() and not list(encoded.glob("*.partial"))


def test_stored_latents_and_embeddings_equal_the_encoders_run_by_hand(encoded, videos, parts):
    """Frames decoded with PyAV, mapped to [-1, 1], through the VAE: the stored posterior; the caption through UMT5
    as WanPipeline encodes it: the stored embedding (cut at the prompt's end). Mutation: frames not mapped to [-1, 1]."""
    from utils.models import encode_prompts

    with av.open(str(videos / "clip1.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][:TINY_WAN_FRAMES]
    pixels = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, F, H, W)
    with torch.no_grad():
        posterior = parts.vae.encode(pixels[None]).latent_dist
    shard = _shard(encoded, 0)
    torch.testing.assert_close(shard["latents_0_mean"][1], posterior.mean[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(shard["latents_0_std"][1], posterior.std[0], rtol=0, atol=1e-6)
    embeds = encode_prompts(parts, ["a square moving right 1"], "cpu").embeds[0]
    length = int(shard["prompt_length"][1])
    assert length == int(embeds.abs().sum(-1).gt(0).sum()) and not embeds[length:].any()
    torch.testing.assert_close(shard["prompt_embeds"][1, :length], embeds[:length], rtol=0, atol=0)


def test_too_short_video_is_a_bad_row(videos):
    from utils.preencode import read_frames

    assert read_frames("clip0.mp4", str(videos), 5, 1).shape == (5, 32, 32, 3)
    with pytest.raises(BadRow, match="6 frames at --frame_stride 1, fewer than --num_frames 9"):
        read_frames("clip0.mp4", str(videos), 9, 1)
    with pytest.raises(BadRow, match="3 frames at --frame_stride 2"):  # frames 0, 2, 4 of 6
        read_frames("clip0.mp4", str(videos), 5, 2)


def test_rerun_skips_finished_shards_and_rewrites_a_partial_one(encoded, videos, tmp_path):
    """Shard 0 finished stays untouched; shard 1, cut off mid-write (only its .partial file), is written again with
    the same numbers; other settings in the same folder are refused."""
    folder = tmp_path / "enc"
    shutil.copytree(encoded, folder)
    before = os.stat(folder / "shard-00000.safetensors").st_mtime_ns
    os.replace(folder / "shard-00001.safetensors", folder / "shard-00001.safetensors.partial")
    os.remove(folder / "manifest.json")
    _preencode("--dataset_name", videos / "captions.jsonl", "--rows_per_shard", SHARD_ROWS, "--output_dir", folder)
    assert os.stat(folder / "shard-00000.safetensors").st_mtime_ns == before
    for name, tensor in _shard(encoded, 1).items():
        torch.testing.assert_close(_shard(folder, 1)[name], tensor, rtol=0, atol=0)
    assert json.loads((folder / "manifest.json").read_text())["num_rows"] == N_CLIPS
    with pytest.raises(UsageError, match="--output_dir .* other settings"):
        _preencode("--dataset_name", videos / "captions.jsonl", "--rows_per_shard", SHARD_ROWS, "--output_dir", folder,
                   "--num_frames", 1)


# --------------------------------------------------------------------------- webdataset shards
def _write_tar(path, members):
    """A webdataset shard: (name, bytes) members in order, each sample's members next to each other."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def tar_shards(videos, tmp_path_factory):
    """The captions file's rows (3 clips, then broken.mp4) as webdataset shards of 2 samples: txt/ with key.txt
    captions, json/ with key.json {"caption", "fps"}; and pairs.jsonl's pairs as key.video_0.mp4, key.video_1.mp4 and
    key.json {"caption", "label_0"} in pairs/."""
    root = tmp_path_factory.mktemp("webdataset")
    rows = [json.loads(line) for line in open(videos / "captions.jsonl")]
    for kind in ("txt", "json"):
        (root / kind).mkdir()
        for k in range(0, len(rows), 2):
            members = []
            for r in rows[k:k + 2]:
                key = r["file"][:-len(".mp4")]
                caption = r["caption"] if kind == "txt" else json.dumps({"caption": r["caption"], "fps": 8})
                members += [(f"{key}.mp4", (videos / r["file"]).read_bytes()), (f"{key}.{kind}", caption.encode())]
            _write_tar(root / kind / f"clips-{k // 2:03d}.tar", members)
    (root / "pairs").mkdir()
    _write_tar(root / "pairs" / "pairs-000.tar", [
        member for k, r in enumerate(json.loads(line) for line in open(videos / "pairs.jsonl")) for member in (
            (f"pair{k}.video_0.mp4", (videos / r["video_0"]).read_bytes()),
            (f"pair{k}.video_1.mp4", (videos / r["video_1"]).read_bytes()),
            (f"pair{k}.json", json.dumps({"caption": r["caption"], "label_0": r["label_0"]}).encode()))])
    return root


def _same_shards(folder, expected, num_shards):
    """Every tensor of each shard equal (float32 throughout: bit for bit), and the same captions and source rows."""
    from safetensors import safe_open

    for k in range(num_shards):
        got, want = _shard(folder, k), _shard(expected, k)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=f"shard {k} {name}")
        mine, theirs = (safe_open(os.path.join(f, f"shard-{k:05d}.safetensors"), "pt").metadata()
                        for f in (folder, expected))
        assert (mine["captions"], mine["rows"]) == (theirs["captions"], theirs["rows"])


def test_webdataset_glob_of_txt_shards_gives_the_captions_files_latents(tar_shards, encoded, tmp_path):
    """A glob of .tar shards (key.mp4 + key.txt) read with the default columns mp4 and txt: the same shards, bad row
    and row count as the same clips through captions.jsonl."""
    out = tmp_path / "wds"
    _preencode("--dataset_name", tar_shards / "txt" / "clips-*.tar", "--rows_per_shard", SHARD_ROWS,
               "--cache_dir", tmp_path / "cache", "--output_dir", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["columns"] == {"video": ["mp4"], "caption": "txt"} and manifest["num_rows"] == N_CLIPS
    [(row, reason)] = manifest["bad_rows"]
    assert row == N_CLIPS and "unreadable video" in reason
    _same_shards(out, encoded, 2)


def test_webdataset_folder_of_json_shards_reads_json_caption_and_the_column_flags(tar_shards, encoded, tmp_path):
    """A folder of .tar shards whose captions are key.json: the default caption column is json.caption; a caption
    flag naming no column lists the json fields found; a glob matching nothing is refused."""
    out = tmp_path / "wds"
    _preencode("--dataset_name", tar_shards / "json", "--rows_per_shard", SHARD_ROWS, "--cache_dir", tmp_path / "cache",
               "--output_dir", out)
    assert json.loads((out / "manifest.json").read_text())["columns"] == {"video": ["mp4"], "caption": "json.caption"}
    _same_shards(out, encoded, 2)
    with pytest.raises(UsageError, match="has no column 'json.text' \\(found: mp4, json.caption, json.fps.*"
                                         "set --caption_column"):
        _preencode("--dataset_name", tar_shards / "json", "--caption_column", "json.text", "--cache_dir",
                   tmp_path / "cache", "--output_dir", tmp_path / "refused")
    with pytest.raises(UsageError, match="no .tar file matches"):
        _preencode("--dataset_name", tar_shards / "txt" / "other-*.tar", "--output_dir", tmp_path / "refused")


def test_webdataset_pairs_give_the_pairs_files_latents(tar_shards, videos, tmp_path):
    """Pairs as webdataset members key.video_0.mp4 / key.video_1.mp4 with caption and label in key.json, named by the
    column flags: the same shard as pairs.jsonl."""
    _preencode("--dataset_name", videos / "pairs.jsonl", "--pairs", "--output_dir", tmp_path / "jsonl")
    _preencode("--dataset_name", tar_shards / "pairs" / "pairs-000.tar", "--pairs", "--video_0_column", "video_0.mp4",
               "--video_1_column", "video_1.mp4", "--label_column", "json.label_0", "--cache_dir", tmp_path / "cache",
               "--output_dir", tmp_path / "wds")
    _same_shards(tmp_path / "wds", tmp_path / "jsonl", 1)
    assert _shard(tmp_path / "wds", 0)["label_0"].tolist() == [1.0, 0.0, 0.5]


# --------------------------------------------------------------------------- training on the folder
def _train(encoded, output_dir, *flags):
    import train_dpo

    return run_main_in_process(train_dpo, [
        "--pretrained_model_name_or_path", "tiny-wan", "--dataset_name", encoded, "--use_lora", "--lora_rank", 4,
        "--train_batch_size", 2, "--max_train_steps", 2, "--learning_rate", 1e-3, "--lr_warmup_steps", 0,
        "--report_to", "none", "--seed", 3, "--output_dir", output_dir, *flags])


def _hand_sft_loss(encoded, parts, seed):
    """train_dpo.py's first SFT loss, by hand: the rows of global batch 0, the noise, t (logit-normal on Wan's shifted
    sigmas) and posterior sample drawn from (seed, 0, 0) in the script's order, the velocity target noise - x_0."""
    from utils.data import GlobalBatchSampler, collate_images
    from utils.denoising import family_noising
    from utils.models import latent_scaling
    from utils.preencoded import open_preencoded
    from utils.seeding import step_generator

    data = open_preencoded(str(encoded), None, seed)
    dataset = data.dataset(1, 0.0, seed)
    positions = GlobalBatchSampler(len(dataset), 2, seed=seed).global_positions(0)
    batch = collate_images([dataset[(int(p), 0, r)] for r, p in enumerate(positions)])
    shape = data.latent_shape
    g = step_generator(seed, 0, 0)
    timesteps = family_noising(parts).draw(2, g)
    noise = torch.randn(2, *shape, generator=g)
    torch.randn(2, shape[0], 1, 1, 1, generator=g)  # the offset noise's draw (scale 0)
    eps = torch.randn(2, 2, *shape, generator=g)
    scale, shift = latent_scaling(parts.vae)
    x0 = (batch["latent_mean"][:, 0] + batch["latent_std"][:, 0] * eps[:, 0] - shift) * scale
    sigma = (timesteps / 1000).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        v = parts.unet(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=timesteps,
                       encoder_hidden_states=batch["prompt_embeds"], return_dict=False)[0]
    return (v - (noise - x0)).pow(2).mean().item()


def test_sft_first_loss_is_the_flow_matching_loss_and_lora_loads_into_wan_pipeline(encoded, parts, tmp_path):
    from diffusers import WanPipeline

    out = tmp_path / "sft"
    log = _train(encoded, out, "--sft", "--proportion_empty_prompts", 0)
    assert "training on 3 videos" in log and "no validation samples for Wan 2.1" in log
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["loss"] == pytest.approx(_hand_sft_loss(encoded, parts, seed=3), rel=1e-5)
    pipe = WanPipeline.from_pretrained(parts.path)
    pipe.load_lora_weights(str(out))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_dpo_on_preencoded_pairs_starts_at_log2(videos, tmp_path):
    enc = tmp_path / "pairs"
    _preencode("--dataset_name", videos / "pairs.jsonl", "--pairs", "--output_dir", enc)
    with pytest.raises(UsageError, match="--choice_model.*pre-encoded"):
        _train(enc, tmp_path / "refused", "--choice_model", "brightness")
    out = tmp_path / "dpo"
    log = _train(enc, out, "--max_train_steps", 1)
    assert "dropped 1 of 3 pairs with a tie" in log and "training on 2 pairs" in log
    assert json.loads(open(out / "metrics.jsonl").readline())["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_manifest_of_another_model_or_single_videos_for_dpo_is_refused(encoded, tmp_path):
    with pytest.raises(UsageError, match="holds single videos.*--pairs.*--sft"):
        _train(encoded, tmp_path / "dpo")
    folder = tmp_path / "other"
    shutil.copytree(encoded, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(model="another/wan", vae={**manifest["vae"], "fingerprint": "0" * 16})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="another VAE than the one of --pretrained_model_name_or_path tiny-wan"):
        _train(folder, tmp_path / "out", "--sft")


def test_wan_on_the_raw_videos_captions_file_points_at_the_preencoding_step(videos, tmp_path):
    """The raw videos' captions file (file, caption) passed to a Wan run: the family check comes before the data's
    columns, so the error names the pre-encoding step rather than a missing image column. Mutation this fails under:
    in train_dpo.py main, open_training_data before check_family_args (the error is then the column check's)."""
    with pytest.raises(UsageError, match="trains on pre-encoded videos: run python -m utils.preencode"):
        _train(videos / "captions.jsonl", tmp_path / "out", "--sft")
