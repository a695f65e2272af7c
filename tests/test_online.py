"""train_online.py: the policy steps' log-probs against hand computations, the clipped objective, the per-prompt
advantages and DiffusionNFT's loss at hand-made points, the old policy's average, and tiny runs of the three methods
(resume exactly, two processes equal to one)."""
import math
import shutil

import pytest
import torch

import train_online as T
from tests.conftest import assert_resumed, deterministic_metrics, free_port, mark_rows_before_resume, run_main_in_process, run_script
from utils.ema import WeightAverage, nft_decay
from utils.flow import FlowSchedule
from utils.sampling import DDIMSchedule
from utils.train.metrics import read_metrics


def normal_log_prob(x, mean, std):
    return -((x - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)


# --------------------------------------------------------------------------- the policy steps
@pytest.mark.parametrize("i", [0, 1, 3])  # step 0 starts at sigma = 1, where the std's denominator takes sigma_1
def test_flow_sde_step_and_its_log_prob_by_hand(i):
    """Mutations: the std's sigma = 1 case not replaced by the second sigma (inf at step 0), a sign of dt flipped in
    the mean, or the log-prob summed instead of averaged over C, H, W fail here."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0), "sd3", 4, (8, 8), "cpu")
    g = torch.Generator().manual_seed(i)
    x, v, noise = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    nxt, log_prob, mean, std = schedule.stochastic_step(v, i, x, 0.7, noise=noise)
    s, s_next, s1 = (float(schedule.sigmas[k]) for k in (i, i + 1, 1))
    dt = s_next - s
    want_std = 0.7 * math.sqrt(s / (1 - (s1 if s == 1 else s)))
    want_mean = x * (1 + want_std ** 2 / (2 * s) * dt) + v * (1 + want_std ** 2 * (1 - s) / (2 * s)) * dt
    step_std = want_std * math.sqrt(-dt)
    assert std == pytest.approx(want_std, rel=1e-12)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nxt.double(), want_mean + step_std * noise, rtol=1e-6, atol=1e-6)
    want_log_prob = normal_log_prob(nxt.double(), want_mean, step_std).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), want_log_prob, rtol=1e-5, atol=1e-5)
    # the same step given x_next (a stored trajectory's) gives the same log-prob
    _, again, _, _ = schedule.stochastic_step(v, i, x, 0.7, prev_sample=nxt)
    torch.testing.assert_close(again, log_prob)


def test_ddim_eta_step_and_its_log_prob_by_hand():
    """DDPO's policy step: x_{t-1} ~ N(sqrt(a_prev) x0_hat + sqrt(1 - a_prev - s^2) eps, s^2), s = eta sqrt(var).
    Mutation: the std without eta, or the direction term without s^2, fails here."""
    from diffusers import DDIMScheduler

    schedule = DDIMSchedule(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          clip_sample=False, set_alpha_to_one=False), 10, "cpu")
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    i, eta = 3, 1.0
    nxt, log_prob, mean, std = schedule.stochastic_step(eps, i, x, eta, noise=noise)
    ac = schedule.scheduler.alphas_cumprod.double()
    t = schedule.timesteps[i]
    a_t, a_prev = ac[t], ac[t - 100]
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    s = eta * var.sqrt()
    x0_hat = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    want_mean = a_prev.sqrt() * x0_hat + (1 - a_prev - s ** 2).sqrt() * eps.double()
    assert std == pytest.approx(float(s), rel=1e-6)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    want_log_prob = normal_log_prob(nxt.double(), want_mean, float(s)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), want_log_prob, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the objectives
def test_clipped_loss_is_minus_the_mean_advantage_at_ratio_one_and_the_clip_stops_the_gradient():
    advantages = torch.tensor([2.0, -1.0, 7.0])
    log_prob = torch.zeros(3, requires_grad=True)
    loss, logs = T.clipped_policy_loss(log_prob, torch.zeros(3), advantages, clip_range=0.1, adv_clip_max=5.0)
    assert float(loss.detach()) == pytest.approx(-(2 - 1 + 5) / 3)  # the third advantage is clipped to 5
    assert float(logs["clipfrac"]) == 0
    # ratio e^0.5 > 1.1 for a positive advantage: the clipped term wins, no gradient; for the negative one the
    # unclipped term wins (the objective stays pessimistic), so its gradient flows
    log_prob = torch.tensor([0.5, 0.5, 0.0], requires_grad=True)
    loss, logs = T.clipped_policy_loss(log_prob, torch.zeros(3), advantages, clip_range=0.1, adv_clip_max=5.0)
    loss.backward()
    ratio = math.exp(0.5)
    assert float(loss.detach()) == pytest.approx((-2 * 1.1 + 1 * ratio - 5 * 1.0) / 3)
    assert log_prob.grad[0] == 0 and log_prob.grad[1] == pytest.approx(ratio / 3)
    assert float(logs["clipfrac"]) == pytest.approx(2 / 3)


def test_the_flow_grpo_objective_raises_the_expected_reward_of_a_policy_it_trains():
    """The whole Flow-GRPO update on a policy small enough to measure exactly: the velocity is one learned vector
    (the same at every x and t), the reward -|x_0 - 1|^2. Groups of trajectories sampled with the SDE, advantages
    from the group, the clipped objective at ratio 1 on every step's log-prob, Adam: after 60 updates the expected
    reward (on 4096 fixed noises) has closed most of the gap from its start to the best this policy can reach.
    Mutations this fails under: the loss's sign flipped (the reward falls), the log-prob of the step's mean instead of
    the stored sample (no gradient), advantages not centred in their group."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0), "sd3", 4, (2, 2), "cpu")
    theta = torch.zeros(1, 1, 2, 2, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.1)

    def rollout(n, g, grad=False):
        """x_T ~ N(0, 1) through the 4 SDE steps: the chain and each step's log-prob."""
        x = torch.randn(n, 1, 2, 2, generator=g)
        chain, log_probs = [x], []
        for i in range(4):
            v = theta.expand(n, -1, -1, -1) if grad else theta.detach().expand(n, -1, -1, -1)
            x, log_prob, _, _ = schedule.stochastic_step(v, i, x, 0.7, noise=torch.randn(x.shape, generator=g))
            chain.append(x)
            log_probs.append(log_prob)
        return chain, log_probs

    def reward(x0):
        return -((x0 - 1) ** 2).mean(dim=(1, 2, 3))

    def expected_reward():
        with torch.no_grad():
            chain, _ = rollout(4096, torch.Generator().manual_seed(123))
            return float(reward(chain[-1]).mean())

    before = expected_reward()
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        with torch.no_grad():
            chain, old_log_probs = rollout(32, g)
        advantages = T.group_advantages(reward(chain[-1]), torch.zeros(32), global_std=False).float()
        optimizer.zero_grad()
        for j in range(4):  # the trained model's log-prob of each stored step, as policy_step computes it
            _, log_prob, _, _ = schedule.stochastic_step(theta.expand(32, -1, -1, -1), j, chain[j], 0.7,
                                                         prev_sample=chain[j + 1])
            loss, _ = T.clipped_policy_loss(log_prob, old_log_probs[j], advantages, clip_range=1e-4, adv_clip_max=5.0)
            (loss / 4).backward()
        optimizer.step()
    after = expected_reward()
    # the best this policy can do: the velocity that maximises the same expected reward, found through the chain
    # itself (reparameterised: x_0 is differentiable in theta for fixed noises)
    trained = theta.detach().clone()
    best = torch.optim.Adam([theta], lr=0.1)
    for _ in range(200):
        best.zero_grad()
        chain, _ = rollout(4096, torch.Generator().manual_seed(123), grad=True)
        (-reward(chain[-1]).mean()).backward()
        best.step()
    optimum = expected_reward()
    assert (after - before) / (optimum - before) > 0.8, (before, after, optimum, trained)


def test_the_nft_objective_raises_the_expected_reward_of_a_policy_it_trains():
    """DiffusionNFT's update on the same kind of policy: the velocity one learned vector, so the ODE from x_T ~ N(0, 1)
    ends at x_0 = x_T - theta and the reward -|x_0 - 1|^2 is best at theta = -1 (expected reward -1, the variance of
    x_T). Each step samples a group with the old policy (the weights of the last step: decay 0), scores it, and
    trains on nft_loss at the schedule's sigmas with fresh noise. After 60 updates theta has closed most of the gap
    to -1. Mutations this fails under: v+ and v- swapped in nft_loss (theta moves away), r = 1 for every sample
    (no negative-aware term: the group's mean x_0 is learned, not its better half)."""
    theta = torch.zeros(1, 1, 2, 2, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    sigmas = torch.linspace(1, 0, 11)[:-1]  # the 10 ODE steps' sigmas
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        old = theta.detach().clone()
        x0 = torch.randn(32, 1, 2, 2, generator=g) - old  # Euler with a constant velocity is exact
        advantages = T.group_advantages(-((x0 - 1) ** 2).mean(dim=(1, 2, 3)), torch.zeros(32), global_std=False)
        optimizer.zero_grad()
        for t in sigmas[torch.randperm(10, generator=g)[:5]].tolist():
            x_t = (1 - t) * x0 + t * torch.randn(x0.shape, generator=g)
            loss, _ = T.nft_loss(theta.expand(32, -1, -1, -1), old.expand(32, -1, -1, -1), x_t, x0,
                                 torch.full((32,), t), advantages.float(), beta=1.0, adv_clip_max=5.0)
            (loss / 5).backward()
        optimizer.step()
    gap_closed = 1 - float((theta.detach() + 1).abs().mean())  # from |0 - (-1)| = 1 at the start
    assert gap_closed > 0.8, theta


def test_group_advantages_use_each_prompts_statistics_or_the_global_std():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0, 4.0])
    prompts = torch.tensor([0, 0, 1, 1, 2, 2])
    per_group = T.group_advantages(rewards, prompts, global_std=False)
    # groups (1, 3): mean 2, std 1; (10, 10): std 0, advantages 0; (0, 4): mean 2, std 2 (population stds)
    want = torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0, 0, -2 / (2 + 1e-4), 2 / (2 + 1e-4)], dtype=torch.float64)
    torch.testing.assert_close(per_group, want)
    std = float(rewards.double().std(unbiased=False))
    global_ = T.group_advantages(rewards, prompts, global_std=True)
    torch.testing.assert_close(global_, torch.tensor([-1, 1, 0, 0, -2, 2], dtype=torch.float64) / (std + 1e-4))


def test_nft_loss_at_hand_made_points():
    """x_0 = 0, x_t = 1, t = 0.5. v = v_old = 0: both x_0 predictions are 1, error 1, weight 1: loss c / beta. v = 2,
    v_old = 0, beta 1: x0+ = 0 (error 0), x0- = 2 (error 4, weight 2): loss 0 for a positive advantage (r = 1), 2c
    for a negative one (r = 0). Mutation: v- = (1 + beta) v - beta v_old (the roles swapped) fails here."""
    x0, x_t, t = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.full((2,), 0.5)
    c = 5.0
    zero = torch.zeros(2, 1, 2, 2)
    loss, _ = T.nft_loss(zero, zero, x_t, x0, t, torch.tensor([3.0, -2.0]), beta=0.5, adv_clip_max=c)
    assert float(loss) == pytest.approx(c / 0.5)
    two = torch.full((2, 1, 2, 2), 2.0)
    for advantage, want in ((c, 0.0), (-c, 2 * c), (0.0, c)):  # A = 0: r = 1/2, half of 2c
        loss, _ = T.nft_loss(two, zero, x_t, x0, t, torch.full((2,), advantage), beta=1.0, adv_clip_max=c)
        assert float(loss) == pytest.approx(want, abs=1e-6), advantage


def test_nft_trains_each_batch_on_a_random_subset_of_the_steps():
    """DiffusionNFT draws the trained timesteps at random (all steps over a run), not always the first ones."""
    args = type("Args", (), {"method": "nft", "num_inference_steps": 10, "seed": 0})()
    subsets = [T.trained_steps_of(args, list(range(9)), step, m) for step in range(4) for m in range(2)]
    assert all(len(s) == 9 and len(set(s)) == 9 for s in subsets)
    assert any(9 in s for s in subsets) and len({tuple(s) for s in subsets}) > 1
    args.method = "flow_grpo"
    assert T.trained_steps_of(args, list(range(9)), 3, 1) == list(range(9))


def test_later_inner_epochs_take_the_batches_in_a_new_seeded_order():
    args = type("Args", (), {"seed": 0})()
    assert T.batch_order(args, 6, 3, 0) == list(range(6))  # the first pass: the sampling order
    orders = [T.batch_order(args, 6, step, epoch) for step in range(3) for epoch in (1, 2)]
    assert all(sorted(o) == list(range(6)) for o in orders) and any(o != list(range(6)) for o in orders)
    assert T.batch_order(args, 6, 2, 1) == orders[4]  # (seed, step, epoch) fixes it: a resume draws it again


def test_the_old_policy_is_an_average_that_follows_the_decay_schedule():
    w = torch.nn.Parameter(torch.tensor([0.0]))
    average = WeightAverage([w], lambda update: nft_decay(update, 1))
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            w.fill_(value)
        average.update()
    # decays 0, 0.001, 0.002: 1 -> 0.001 * 1 + 0.999 * 2 -> 0.002 * that + 0.998 * 3
    first = 1.0
    second = 0.001 * first + 0.999 * 2
    assert float(average.average[0]) == pytest.approx(0.002 * second + 0.998 * 3)
    with torch.no_grad(), average.swapped_in():
        assert float(w) == pytest.approx(float(average.average[0]))
    assert float(w.detach()) == 3.0
    assert [nft_decay(s, 2) for s in (0, 74, 75, 76, 1000)] == [0.0, 0.0, 0.0, 0.0075, 0.999]


# --------------------------------------------------------------------------- tiny runs
def online_flags(method, out, *extra):
    model = "tiny-sd" if method == "ddpo" else "tiny-sd3"
    return ["--method", method, "--pretrained_model_name_or_path", model, "--reward_model", "brightness",
            "--prompts", "colored_animals", "--group_size", 2, "--train_batch_size", 2, "--num_inference_steps", 3,
            "--learning_rate", 1e-3, "--lora_rank", 4, "--report_to", "none", "--validation_steps", 1000,
            "--output_dir", out, *extra]


def test_a_second_inner_epoch_updates_again_against_the_sampling_policy(tmp_path):
    """--inner_epochs 2: the step's samples are trained on twice, the second pass by weights one update away from
    the sampling policy and the reference. The first pass's LoRA is zero, so its KL to the reference (the same model,
    adapters off) is exactly 0; the second pass's is not (measured 2.6e-7, the step's mean over both passes).
    Mutation this fails under: in train_online.py main, `range(args.inner_epochs)` in the plan made `range(1)`."""
    one = run_main_in_process(T, online_flags("flow_grpo", tmp_path / "one", "--max_train_steps", 1)) and \
        read_metrics(str(tmp_path / "one"))[0]
    two = run_main_in_process(T, online_flags("flow_grpo", tmp_path / "two", "--max_train_steps", 1,
                                              "--inner_epochs", 2)) and read_metrics(str(tmp_path / "two"))[0]
    assert one["kl"] == 0 and two["kl"] > 1e-9
    assert one["reward"] == two["reward"]  # the same samples


@pytest.mark.parametrize("method", ["flow_grpo", "nft", "ddpo"])
def test_a_run_resumes_exactly(method, tmp_path, tiny_sd_path):
    """3 steps of 2 updates each, a checkpoint every step; the resume from step 2 writes the rows the straight run
    wrote, equal on the CPU (NFT: its old policy is in the checkpoint)."""
    out = tmp_path / "run"
    flags = online_flags(method, out, "--max_train_steps", 3, "--checkpointing_steps", 1, "--updates_per_epoch", 2)
    run_main_in_process(T, flags)
    straight = read_metrics(str(out))
    assert [r["step"] for r in straight] == [1, 2, 3] and all(r["skipped"] == 0 for r in straight)
    if method == "flow_grpo":  # the first update samples and trains the same policy: ratio 1, loss = -mean(A) = 0
        assert straight[0]["approx_kl"] < 1e-6
    shutil.rmtree(out / "checkpoint-3")
    mark_rows_before_resume(out)
    log = run_main_in_process(T, [*flags, "--resume_from_checkpoint", "latest"])
    resumed = assert_resumed(out, log, 2)
    assert deterministic_metrics(resumed) == deterministic_metrics(straight)


def test_two_processes_gather_the_rewards_of_one(tmp_path):
    """Flow-GRPO on 2 gloo processes x batch 1 against 1 process x batch 2: the same images (noise drawn for the
    global batch), rewards gathered before the advantages, so reward, its std and the loss agree."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_main_in_process(T, online_flags("flow_grpo", one, "--max_train_steps", 2))
    flags = online_flags("flow_grpo", two, "--max_train_steps", 2)
    flags[flags.index("--train_batch_size") + 1] = 1
    # several CPU processes need --multi_gpu (torchrun) with ACCELERATE_USE_CPU set
    run_script(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", 2, "--num_machines", 1,
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
                "train_online.py", *flags], env={"ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""})
    for a, b in zip(read_metrics(str(one)), read_metrics(str(two))):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["reward_std"] == pytest.approx(b["reward_std"],
                                                                                                         abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_a_reward_that_fails_mid_run_ends_it_with_the_last_step_checkpointed(tmp_path, monkeypatch):
    """A reward server that stays down after its retries raises a one-line UsageError from `score`; the run must
    not train on a made-up reward: it checkpoints the last completed step and ends with that error. (Here the
    scorer fails on its third call, step 2's first batch; utils/reward_server.py's own failures are tested in
    tests/test_rewards_nograd.py.) Mutation: dropping run.abort from train_online.py's reward phase fails here."""
    from utils import UsageError

    load_reward = T.load_reward

    def failing_on_the_third_call(*args, **kwargs):
        scorer, calls = load_reward(*args, **kwargs), []
        score = scorer.score

        def score_or_fail(images, prompts):
            calls.append(1)
            if len(calls) == 3:
                raise UsageError("reward server http://127.0.0.1:9: no answer within 1 s (3 attempts)")
            return score(images, prompts)

        scorer.score = score_or_fail
        return scorer

    monkeypatch.setattr(T, "load_reward", failing_on_the_third_call)
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"no answer within 1 s \(3 attempts\); \S+checkpoint-1 holds step 1"):
        run_main_in_process(T, online_flags("flow_grpo", out, "--max_train_steps", 3, "--gradient_accumulation_steps",
                                            2, "--checkpointing_steps", 100))
    assert [r["step"] for r in read_metrics(str(out))] == [1]
    assert (out / "checkpoint-1" / "training_state.json").exists()
