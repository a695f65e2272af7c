"""Rewards without a gradient (utils/rewards.py): DDPO's JPEG rewards, the toy world's judge as a reward, weighted sums
of both kinds, the differentiable path refusing them (and train_draftp.py before anything loads), and the reward
server's client against utils/reward_server.py run as a real process on 127.0.0.1."""
import io
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, free_port
from utils import UsageError
from utils import rewards
from utils.rewards import (HttpReward, RewardServerError, load_reward, list_rewards, reward_is_differentiable,
                           tensor_to_pil)

PROMPTS = ["a red circle", "two blue squares", "three green triangles"]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours http_proxy: requests to the local server must not go through one."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def noise_and_flat_images():
    """A seeded noise image (compresses badly) and a flat one (compresses well), 64 px."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), (200, 40, 90), np.uint8)
    return [Image.fromarray(noise), Image.fromarray(flat)]


def jpeg_kb(image, **save_args) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save_args)
    return len(buffer.getvalue()) / 1000


# --------------------------------------------------------------------------- JPEG (DDPO)
def test_jpeg_rewards_are_plus_and_minus_the_jpeg_size_in_kb_at_quality_95():
    """DDPO's definition (ddpo-pytorch, ddpo_pytorch/rewards.py): PIL JPEG at quality 95, bytes / 1000. Mutation: the
    quality left at PIL's default (75) or the size in KiB (/ 1024) fails the equality."""
    images = noise_and_flat_images()
    by_hand = [jpeg_kb(image, quality=95) for image in images]
    assert by_hand[0] > 5 * by_hand[1]  # the image decides the reward, and noise costs the most bytes
    assert load_reward("jpeg_incompressibility").score(images, PROMPTS[:2]) == by_hand
    assert load_reward("jpeg_compressibility").score(images, PROMPTS[:2]) == [-kb for kb in by_hand]
    assert by_hand[0] != jpeg_kb(images[0])  # quality 95 is not PIL's default: the check above can tell


def test_tensor_to_pil_rounds_as_ddpo():
    """Decoded images reach score() through tensor_to_pil: (x * 255).round(), clamped, as DDPO and diffusers do."""
    x = torch.rand(2, 3, 8, 8) * 1.2 - 0.1
    expected = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack([np.asarray(im) for im in tensor_to_pil(x)]), expected)


# --------------------------------------------------------------------------- the toy world's judge
def test_toyworld_judge_scores_one_where_count_colour_and_shape_all_match():
    """On drawn toy-world scenes: the judge reward is prompt_accuracy(...)['all'], 1.0 for the scene's own prompt,
    0.0 for a prompt with one attribute wrong; prompts that name no shape fail instead of scoring 0."""
    from utils.toy.world import Scene, prompt_accuracy, render, subject

    rng = np.random.default_rng(0)
    scenes = [Scene(1, "red", "circle", "anywhere", "white"), Scene(2, "blue", "square", "left", "black"),
              Scene(3, "yellow", "triangle", "anywhere", "gray")]
    arrays = [render(scene, rng) for scene in scenes]
    images = [Image.fromarray(a) for a in arrays]
    right = [subject(s.count, s.color, s.shape) for s in scenes]
    wrong = [subject(2, "red", "circle"), subject(2, "green", "square"), subject(3, "yellow", "circle")]
    judge = load_reward("toyworld_judge")
    assert not judge.differentiable
    assert judge.score(images, right) == [1.0, 1.0, 1.0]
    assert judge.score(images, wrong) == [0.0, 0.0, 0.0]
    assert judge.score(images, wrong) == [prompt_accuracy(a, p)["all"] for a, p in zip(arrays, wrong)]
    with pytest.raises(UsageError, match="toyworld_judge reward reads toy-world prompts"):
        judge.score(images[:1], ["a photo of a cat"])


# --------------------------------------------------------------------------- the two kinds
def test_the_registry_knows_each_kind_before_loading():
    """The flag train_draftp.py checks comes from register_reward, so nothing loads to decide it."""
    no_gradient = {name for name in list_rewards() if not reward_is_differentiable(name)}
    assert no_gradient == {"jpeg_compressibility", "jpeg_incompressibility", "http", "toyworld_judge", "toyvideo_judge"}
    assert reward_is_differentiable("brightness:1.0,saturation:0.5")
    assert not reward_is_differentiable("brightness:1.0,jpeg_compressibility:0.5")


def test_differentiable_path_refuses_a_reward_without_gradient():
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    scorer = load_reward("jpeg_compressibility")
    for path in (scorer, scorer.parts):
        with pytest.raises(UsageError, match="reward 'jpeg_compressibility' has no gradient") as err:
            path(images, PROMPTS[:2])
        assert "\n" not in str(err.value)
    assert load_reward("brightness").differentiable


def test_weighted_sums_mix_both_kinds():
    """score sums the weighted parts' scores; the differentiable path works only when every part has a gradient."""
    images = noise_and_flat_images()
    mixed = load_reward("brightness:1.0,jpeg_incompressibility:0.5")
    assert not mixed.differentiable
    bright = load_reward("brightness").score(images, PROMPTS[:2])
    size = load_reward("jpeg_incompressibility").score(images, PROMPTS[:2])
    assert mixed.score(images, PROMPTS[:2]) == pytest.approx([b + 0.5 * s for b, s in zip(bright, size)], rel=1e-12)
    with pytest.raises(UsageError, match="reward 'jpeg_incompressibility' has no gradient"):
        mixed(torch.rand(2, 3, 16, 16), PROMPTS[:2])

    both = load_reward("brightness:1.0,saturation:2.0")
    assert both.differentiable
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    both(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_builder_that_contradicts_its_registration_is_refused(monkeypatch):
    """train_draftp.py trusts the registered flag: a plugin that registers a score-only scorer as differentiable fails
    at load time, naming the fix."""
    monkeypatch.setitem(rewards._REGISTRY, "liar", rewards._Entry(lambda name, path: rewards.JpegSize(name, 1.0), False))
    with pytest.raises(UsageError, match=r"register_reward\('liar', \.\.\., differentiable=False\)"):
        load_reward("liar")


def test_train_draftp_refuses_a_reward_without_gradient_in_one_line(run_script, tmp_path):
    """At argument-check time (exit 2 before any model loads), naming the flag and the reward."""
    proc = run_script(["train_draftp.py", "--pretrained_model_name_or_path", "tiny-sd", "--reward_model",
                       "brightness:1.0,toyworld_judge:1.0", "--output_dir", str(tmp_path / "run")], expect_ok=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --reward_model: reward 'toyworld_judge' has no gradient"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "args.json").exists()


# --------------------------------------------------------------------------- the reward server
def start_server(log_dir, *flags):
    """utils/reward_server.py on a free port of 127.0.0.1; returns (process, url) once it accepts connections."""
    port = free_port()
    log = open(os.path.join(log_dir, f"server-{port}.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "utils.reward_server", "--port", str(port), *flags], cwd=REPO_ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}/"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"reward server did not start: {open(log.name).read()[-3000:]}")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


SERVED = "brightness:1.0,jpeg_incompressibility:0.01"  # a sum with a part without gradient: any reward serves


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A good server and a bad one (each answer 2 s late and one score short), started together."""
    log_dir = str(tmp_path_factory.mktemp("reward_servers"))
    good = start_server(log_dir, "--reward", SERVED)
    bad = start_server(log_dir, "--reward", "brightness", "--sleep", "2", "--drop_scores", "1")
    yield {"good": good[1], "bad": bad[1]}
    stop(good[0])
    stop(bad[0])


def test_server_round_trip_equals_the_local_reward(servers):
    """Several requests (batch_size 4 for 10 images) come back in order and equal the reward computed here (PNG is
    lossless); an http part mixes with a local one in a weighted sum."""
    images = tensor_to_pil(torch.rand(10, 3, 24, 24, generator=torch.Generator().manual_seed(0)))
    prompts = [f"prompt {i}" for i in range(10)]
    remote = load_reward("http", paths={"http": servers["good"]})
    assert not remote.differentiable
    remote.batch_size = 4
    local = load_reward(SERVED).score(images, prompts)
    assert remote.score(images, prompts) == local
    mixed = load_reward("http:2.0,saturation:1.0", paths={"http": servers["good"]})
    saturation = load_reward("saturation").score(images, prompts)
    assert mixed.score(images, prompts) == pytest.approx([2 * r + s for r, s in zip(local, saturation)], rel=1e-12)
    with pytest.raises(UsageError, match="reward 'http' has no gradient"):
        remote(torch.rand(1, 3, 8, 8), ["a"])


def test_server_down_fails_at_load_in_one_line(monkeypatch):
    """Connection refused: the client's empty request at load time fails after the retries (env-configured)."""
    url = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    monkeypatch.setenv(rewards.REWARD_RETRIES_ENV, "1")
    monkeypatch.setenv(rewards.REWARD_TIMEOUT_ENV, "2")
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="no connection") as err:
        load_reward("http", paths={"http": url})
    assert time.monotonic() - start < 10  # 2 attempts, 1 s back-off between them
    message = str(err.value)
    assert "\n" not in message and f"reward server {url}" in message and "2 attempts" in message


def test_slow_server_times_out_after_the_retries(servers):
    client = HttpReward("http", servers["bad"], timeout=0.5, retries=1, backoff=0.1)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=r"no answer within 0\.5 s \(2 attempts") as err:
        client.score(noise_and_flat_images(), PROMPTS[:2])
    assert time.monotonic() - start < 6
    assert "\n" not in str(err.value) and servers["bad"] in str(err.value)


def test_wrong_shape_answer_fails_after_the_retries(servers):
    client = HttpReward("http", servers["bad"], timeout=30, retries=1, backoff=0.1)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=r"the answer holds 1 scores for 2 images \(2 attempts") as err:
        client.score(noise_and_flat_images(), PROMPTS[:2])
    assert time.monotonic() - start < 20
    assert "\n" not in str(err.value) and servers["bad"] in str(err.value)


def test_a_refused_request_is_not_retried_and_quotes_the_server(servers):
    """A 400 answer (here: an image that is not base64) means the request itself is wrong: one attempt, the server's
    own error in the message."""
    client = HttpReward("http", servers["good"], timeout=10, retries=3, backoff=5)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=r"HTTP 400 .*not a base64 PNG.*1 attempt, not retried"):
        client.request(["%%% not base64 %%%"], ["a"])
    assert time.monotonic() - start < 5  # no back-off of 5 s


@pytest.mark.parametrize("answer, why", [
    (b'{"scores": [1.0, NaN]}', "1 of the 2 scores are not finite numbers, e.g. NaN"),
    (b'{"scores": [1.0, "2"]}', 'not finite numbers, e.g. "2"'),
    (b'{"scores": [1.0]}', "the answer holds 1 scores for 2 images"),
    (b'{"score": [1.0, 2.0]}', "the answer has no list 'scores'"),
    (b"<html>busy</html>", "the answer is not JSON"),
])
def test_bad_answers_are_retried_then_refused(answer, why, monkeypatch):
    """Whatever is wrong with an answer, no reward is made up: retries, then one line saying what was wrong."""
    client = HttpReward("http", "http://127.0.0.1:9/score", retries=2, backoff=0)
    calls = []
    monkeypatch.setattr(client, "_post", lambda body: calls.append(body) or answer)
    with pytest.raises(RewardServerError, match=f"{__import__('re').escape(why)}.*3 attempts"):
        client.score(noise_and_flat_images(), PROMPTS[:2])
    assert len(calls) == 3


@pytest.mark.parametrize("url, why", [(None, "needs its URL"), ("localhost:8000", "is not an http:// or https:// URL")])
def test_http_reward_needs_a_url(url, why):
    with pytest.raises(UsageError, match=f"{why}.*--reward_model_paths http=http://HOST:PORT/"):
        load_reward("http", paths={"http": url} if url else None)
