"""experiments/toyworld_pretrain_wan.sh end to end at a smoke size: clips, the video VAE, the initial pipeline,
pre-encoding, SFT of the transformer, the finished pipeline and its evaluation on the toyvideo prompts; the result
loads through diffusers' WanPipeline and the project's loader and samples clips of the asked shape."""
import os
import sys

import torch

from conftest import REPO_ROOT, run_command

NUM_FRAMES, SIZE = 5, 64


def test_pretrain_wan_script_writes_a_pipeline_that_loads_and_samples(tmp_path):
    from diffusers import WanPipeline

    from utils.models import load_pipeline_parts

    toy_wan = tmp_path / "toy-wan"
    env = {**os.environ, "WORK": str(tmp_path / "work"), "TOY_WAN": str(toy_wan), "PYTHON": sys.executable,
           "NUM_CLIPS": "8", "CLIP_JOBS": "2", "NUM_FRAMES": str(NUM_FRAMES), "SIZE": str(SIZE), "VAE_STEPS": "2",
           "VAE_BATCH_SIZE": "1", "SFT_STEPS": "2", "TRAIN_BATCH_SIZE": "2", "EVAL_PROMPTS": "1", "EVAL_SEEDS": "1",
           "EVAL_STEPS": "2"}
    proc = run_command(["bash", REPO_ROOT / "experiments" / "toyworld_pretrain_wan.sh"], timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "held-out clips the toy video judge reads" in proc.stdout  # the VAE's reconstruction check ran
    assert "toyvideo_acc" in proc.stdout  # evaluate.py's table, printed at the end
    captions = (tmp_path / "work" / "clips" / "captions.jsonl").read_text().splitlines()
    assert len(captions) == 8 and '"file": "part1/clips/00000.mp4"' in captions[4]  # both writers' shares, merged

    # the SFT-trained transformer, not the initial random one, went into the pipeline (stored in float16)
    from diffusers import WanTransformer3DModel

    trained = WanTransformer3DModel.from_pretrained(toy_wan, subfolder="transformer")
    initial = WanTransformer3DModel.from_pretrained(tmp_path / "work" / "init", subfolder="transformer")
    assert any(not torch.equal(a.half().float(), b) for a, b in zip(initial.parameters(), trained.parameters()))

    pipe = WanPipeline.from_pretrained(toy_wan)
    frames = pipe("two red circles moving left", num_frames=NUM_FRAMES, height=SIZE, width=SIZE, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, NUM_FRAMES, SIZE, SIZE, 3)

    parts = load_pipeline_parts(str(toy_wan))
    assert parts.family == "wan" and parts.is_video
    assert parts.latent_shape(SIZE, NUM_FRAMES) == (8, 2, SIZE // 4, SIZE // 4)  # 4x spatial, 1 + 4 frames -> 2
