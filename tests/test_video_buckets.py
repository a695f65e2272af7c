"""Size buckets for pre-encoded video (`python -m utils.preencode --buckets`, tiny-wan): toy clips of three aspect
ratios land in the bucket nearest their own and are stored as that bucket's clips encoded alone at its size; a resumed
encoding rewrites a chunk cut off between its bucket files and refuses other buckets; train_dpo.py --sft draws every
batch from one bucket and resumes exactly; pairs follow their first video's bucket; bad buckets are refused before any
model loads."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import (assert_resumed, deterministic_metrics, frozen_tiny_parts, mark_rows_before_resume,
                      run_main_in_process, write_jsonl, write_square_clip)
from utils import UsageError
from utils.toy.tiny import TINY_WAN_FRAMES

av = pytest.importorskip("av")

BUCKETS = ["32x48", "48x32", "32x32"]
# (file, height, width): in this order in captions.jsonl; 32x40 is nearer 32x48 (ratio of ratios 1.2) than 32x32 (1.25)
CLIPS = [("wide0", 32, 48), ("tall0", 48, 32), ("square", 32, 32), ("wide2", 32, 40), ("tall1", 48, 32),
         ("wide1", 32, 48)]
EXPECTED = {"32x48": ["wide0", "wide2", "wide1"], "48x32": ["tall0", "tall1"], "32x32": ["square"]}
SHARD_ROWS = 4  # chunk 0: wide0, tall0, square, wide2 (three bucket files); chunk 1: tall1, wide1 (two)


def _preencode(*flags):
    from utils.preencode import main, parse_args

    main(parse_args([str(f) for f in ("--pretrained_model_name_or_path", "tiny-wan", "--num_frames", TINY_WAN_FRAMES,
                                      "--dtype", "float32", *flags)]))


def _caption(name):
    return f"a square moving right in {name}"


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """The clips, captions.jsonl, one captions file per bucket of only its clips, and pairs.jsonl (each pair's
    videos of two aspect ratios)."""
    folder = tmp_path_factory.mktemp("videos")
    for k, (name, height, width) in enumerate(CLIPS):
        write_square_clip(folder / f"{name}.mp4", height, width, 6, 10 * k, k)
    write_jsonl(folder / "captions.jsonl", [{"file": f"{n}.mp4", "caption": _caption(n)} for n, _, _ in CLIPS])
    for bucket, names in EXPECTED.items():
        write_jsonl(folder / f"{bucket}.jsonl", [{"file": f"{n}.mp4", "caption": _caption(n)} for n in names])
    write_jsonl(folder / "pairs.jsonl", [
        {"video_0": "wide0.mp4", "video_1": "tall0.mp4", "label_0": 1.0, "caption": "wide first"},
        {"video_0": "tall1.mp4", "video_1": "wide1.mp4", "label_0": 0.0, "caption": "tall first"},
        {"video_0": "square.mp4", "video_1": "wide2.mp4", "label_0": 1.0, "caption": "square first"}])
    return folder


@pytest.fixture(scope="module")
def bucketed(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("bucketed")
    _preencode("--dataset_name", videos / "captions.jsonl", "--buckets", *BUCKETS, "--rows_per_shard", SHARD_ROWS,
               "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def parts():
    return frozen_tiny_parts("tiny-wan")


def _load(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# --------------------------------------------------------------------------- choosing a bucket
def test_nearest_bucket_by_aspect_ratio_ties_to_the_first_listed():
    from utils.preencode import nearest_bucket

    wide, tall, square = (480, 832), (832, 480), (624, 624)
    assert nearest_bucket(720, 1280, [wide, tall, square]) == 0
    assert nearest_bucket(1920, 1080, [wide, tall, square]) == 1
    assert nearest_bucket(500, 510, [wide, tall, square]) == 2
    # a square video is exactly as far from 480x832 as from 832x480: the bucket listed first
    assert nearest_bucket(64, 64, [wide, tall]) == 0 and nearest_bucket(64, 64, [tall, wide]) == 0
    assert nearest_bucket(32, 40, [(32, 48), (32, 32)]) == 0  # 1.2 against 1.25


def test_bad_buckets_are_refused_before_any_model_loads():
    """parse_args alone (no model is read): not HxW, not multiples of 16 (with the nearest right size), one aspect
    ratio twice, --buckets with --resolution."""
    from utils.preencode import parse_args

    def args(*flags):
        return parse_args(["--pretrained_model_name_or_path", "no/such-model", "--dataset_name", "x.jsonl",
                           "--output_dir", "out", *flags])

    with pytest.raises(UsageError, match="--buckets 480x830: .*multiples of 16.*e.g. 480x832"):
        args("--buckets", "480x832", "480x830")
    with pytest.raises(UsageError, match="--buckets 480by832: each bucket is HEIGHTxWIDTH"):
        args("--buckets", "480by832")
    with pytest.raises(UsageError, match="--buckets 8x16: .*e.g. 16x16"):
        args("--buckets", "8x16")
    with pytest.raises(UsageError, match="--buckets 32x32 and 64x64 have one aspect ratio"):
        args("--buckets", "32x32", "64x64")
    with pytest.raises(UsageError, match="--resolution and --buckets.*drop --resolution"):
        args("--buckets", "32x48", "--resolution", "32")
    parsed = args("--buckets", "480x832", "832x480")
    assert parsed.buckets == [(480, 832), (832, 480)] and parsed.height is None


# --------------------------------------------------------------------------- pre-encoding
def test_clips_land_in_their_buckets_as_if_encoded_alone_at_its_size(bucketed, videos, tmp_path):
    """Per chunk of SHARD_ROWS source rows one file per bucket it holds; the manifest lists each shard's bucket and
    latent shape and each bucket's rows; every bucket's rows equal (bit for bit, float32) those of encoding its clips
    alone with --height / --width of the bucket."""
    manifest = json.loads((bucketed / "manifest.json").read_text())
    assert [(s["file"], s["bucket"], s["rows"], s["latent_shape"]) for s in manifest["shards"]] == [
        ("shard-00000-32x48.safetensors", "32x48", 2, [16, 2, 4, 6]),
        ("shard-00000-48x32.safetensors", "48x32", 1, [16, 2, 6, 4]),
        ("shard-00000-32x32.safetensors", "32x32", 1, [16, 2, 4, 4]),
        ("shard-00001-32x48.safetensors", "32x48", 1, [16, 2, 4, 6]),
        ("shard-00001-48x32.safetensors", "48x32", 1, [16, 2, 6, 4])]
    assert [(b["size"], b["rows"], b["latent_shape"]) for b in manifest["buckets"]] == [
        ("32x48", 3, [16, 2, 4, 6]), ("48x32", 2, [16, 2, 6, 4]), ("32x32", 1, [16, 2, 4, 4])]
    assert manifest["num_rows"] == len(CLIPS) and manifest["latent_shape"] is None and manifest["height"] is None
    assert not list(bucketed.glob("*.partial"))
    for bucket, names in EXPECTED.items():
        height, width = bucket.split("x")
        alone = tmp_path / bucket
        _preencode("--dataset_name", videos / f"{bucket}.jsonl", "--height", height, "--width", width, "--output_dir",
                   alone)
        want, _ = _load(alone / "shard-00000.safetensors")
        rows = {}  # source row -> (tensors of its shard, index in it)
        for shard in manifest["shards"]:
            if shard["bucket"] == bucket:
                tensors, meta = _load(bucketed / shard["file"])
                rows.update({row: (tensors, i) for i, row in enumerate(json.loads(meta["rows"]))})
        assert [CLIPS[r][0] for r in sorted(rows)] == names
        for j, row in enumerate(sorted(rows)):
            got, i = rows[row]
            for name in ("latents_0_mean", "latents_0_std", "prompt_length"):
                torch.testing.assert_close(got[name][i], want[name][j], rtol=0, atol=0, msg=f"{bucket} {name}")
            length = int(want["prompt_length"][j])
            torch.testing.assert_close(got["prompt_embeds"][i, :length], want["prompt_embeds"][j, :length], rtol=0,
                                       atol=0)


def test_resume_rewrites_a_chunk_cut_off_between_bucket_files_and_refuses_other_buckets(bucketed, videos, tmp_path):
    """Chunk 1 lost one of its two bucket files (cut off between the renames): a rerun writes both again, the same
    numbers; chunk 0 is left untouched. Other buckets in the same folder are refused, naming them."""
    folder = tmp_path / "enc"
    shutil.copytree(bucketed, folder)
    before = {p.name: os.stat(p).st_mtime_ns for p in folder.glob("shard-00000-*")}
    os.replace(folder / "shard-00001-48x32.safetensors", folder / "shard-00001-48x32.safetensors.partial")
    os.remove(folder / "manifest.json")
    _preencode("--dataset_name", videos / "captions.jsonl", "--buckets", *BUCKETS, "--rows_per_shard", SHARD_ROWS,
               "--output_dir", folder)
    assert {p.name: os.stat(p).st_mtime_ns for p in folder.glob("shard-00000-*")} == before
    for name in ("shard-00001-32x48.safetensors", "shard-00001-48x32.safetensors"):
        (got, got_meta), (want, want_meta) = _load(folder / name), _load(bucketed / name)
        assert got.keys() == want.keys() and got_meta == want_meta
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert (folder / "manifest.json").read_text() == (bucketed / "manifest.json").read_text()
    with pytest.raises(UsageError, match="--output_dir .* other settings \\(shard-00000-\\S+: buckets;"):
        _preencode("--dataset_name", videos / "captions.jsonl", "--buckets", "32x48", "48x32", "--rows_per_shard",
                   SHARD_ROWS, "--output_dir", folder)


# --------------------------------------------------------------------------- training on the folder
def _train(folder, output_dir, *flags):
    import train_dpo

    return run_main_in_process(train_dpo, [
        "--pretrained_model_name_or_path", "tiny-wan", "--dataset_name", folder, "--use_lora", "--lora_rank", 4,
        "--train_batch_size", 2, "--learning_rate", 1e-3, "--lr_warmup_steps", 0, "--report_to", "none",
        "--seed", 3, "--output_dir", output_dir, *flags])


def test_every_batch_is_one_bucket_across_processes_and_resumed_streams(bucketed, tmp_path):
    """The sampler on the folder's rows: each global batch from one bucket (the square one, 1 row, never: it holds
    no global batch of 2), each epoch every full batch of each bucket once; two processes of 1 see one process of 2's
    batches; a start at micro-step 3 continues the stream. A global batch larger than every bucket is refused before
    the model loads."""
    from utils.data import BucketBatchSampler
    from utils.preencoded import open_preencoded

    data = open_preencoded(str(bucketed), None, 3)
    assert data.bucket_names == BUCKETS and data.latent_shape is None
    assert [CLIPS[json.loads(_load(bucketed / f)[1]["rows"])[i]][0] for f, i in data.index] == \
        ["wide0", "wide2", "tall0", "square", "wide1", "tall1"]  # the manifest's shard order
    sampler = BucketBatchSampler(data.buckets, 2, seed=3)
    stream = iter(sampler)
    batches = [next(stream) for _ in range(6)]
    buckets = [{int(data.buckets[p]) for p, _, _ in batch} for batch in batches]
    assert all(len(b) == 1 for b in buckets) and sorted(b.pop() for b in buckets[:2]) == [0, 1]
    assert sampler.per_epoch == 2 and [m for batch in batches for _, m, _ in batch] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4,
                                                                                          5, 5]
    assert len({p for batch in batches[:2] for p, _, _ in batch}) == 4  # no row twice in an epoch
    halves = [iter(BucketBatchSampler(data.buckets, 1, 2, p, seed=3)) for p in (0, 1)]
    assert [next(halves[0]) + next(halves[1]) for _ in range(6)] == batches
    resumed = iter(BucketBatchSampler(data.buckets, 2, seed=3, start_micro_step=3))
    assert [next(resumed) for _ in range(3)] == batches[3:]
    with pytest.raises(UsageError, match="one size bucket, and none holds a global batch .*32x48 3, 48x32 2, 32x32 1"):
        _train(bucketed, tmp_path / "out", "--sft", "--train_batch_size", 4)


def test_sft_on_buckets_resumes_exactly(bucketed, tmp_path):
    """4 steps of batch 2 over two buckets of other latent shapes (a batch of two shapes would not stack, noise of
    another shape would not add), checkpoint at 2; resumed from it, the metrics after step 2 equal (==) the run's."""
    out = tmp_path / "sft"
    log = _train(bucketed, out, "--sft", "--max_train_steps", 4, "--checkpointing_steps", 2)
    assert "training on 6 videos" in log and "size buckets 32x48, 48x32, 32x32 (one per batch)" in log
    assert "buckets 32x32 (1 rows) hold fewer rows than a global batch of 2: never trained on" in log
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and len({m["loss"] for m in metrics}) == 4
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    mark_rows_before_resume(resumed)
    log = _train(bucketed, resumed, "--sft", "--max_train_steps", 4, "--checkpointing_steps", 2,
                 "--resume_from_checkpoint", "latest")
    assert deterministic_metrics(assert_resumed(resumed, log, 2)) == deterministic_metrics(metrics)


def test_pairs_take_the_first_videos_bucket_and_train_dpo(videos, parts, tmp_path):
    """A pair's bucket is its first video's; the second video is scaled and cropped to it (against the VAE run by hand
    on the cropped frames). DPO on the folder starts at log 2."""
    from utils.denoising import vae_moments
    from utils.preencode import read_frames, resize_center_crop

    enc = tmp_path / "pairs"
    _preencode("--dataset_name", videos / "pairs.jsonl", "--pairs", "--buckets", *BUCKETS, "--output_dir", enc)
    manifest = json.loads((enc / "manifest.json").read_text())
    assert [(s["bucket"], s["rows"]) for s in manifest["shards"]] == [("32x48", 1), ("48x32", 1), ("32x32", 1)]
    tensors, meta = _load(enc / "shard-00000-32x48.safetensors")
    assert json.loads(meta["rows"]) == [0] and tensors["label_0"].tolist() == [1.0]
    pixels = resize_center_crop(read_frames("tall0.mp4", str(videos), TINY_WAN_FRAMES, 1), 32, 48)  # (3, F, 32, 48)
    mean, std = vae_moments(parts.vae, pixels[None, None])
    torch.testing.assert_close(tensors["latents_1_mean"][0], mean[0, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(tensors["latents_1_std"][0], std[0, 0], rtol=0, atol=1e-6)
    out = tmp_path / "dpo"
    log = _train(enc, out, "--max_train_steps", 1, "--train_batch_size", 1)
    assert "training on 3 pairs" in log
    assert json.loads(open(out / "metrics.jsonl").readline())["loss"] == pytest.approx(np.log(2), abs=1e-6)
