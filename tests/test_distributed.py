"""Distributed set-up: the strategies the scripts refuse (before loading a model), the pieces that FSDP and DeepSpeed
need (inputs cast to the engine's dtype, weights written from a gathered state dict), and the SLURM entry point
(the command line it builds, and a 2-process CPU run through it that matches one process).

FSDP and DeepSpeed themselves need GPUs (accelerate turns an FSDP config on the CPU into plain DDP):
bench/distributed.py runs every config end to end on the GPU machine (BENCHMARKS.md "Distributed")."""
import os
import shlex
import sys
import types

import pytest
import torch
from accelerate.utils import DistributedType

from conftest import REPO_ROOT, free_port, run_command
from utils import UsageError
from utils.speed import check_speed_args
from utils.train.checkpoints import save_unet_weights
from utils.train.distributed import check_distributed_setup as check_strategy
from utils.train.distributed import shards_parameters, strategy_name, unet_is_wrapped
from utils.train.metrics import read_metrics

NODE = str(REPO_ROOT / "launchers" / "slurm" / "launch_node.sh")


def fake_accelerator(kind, fsdp_version=2, zero_stage=2):
    """What check_distributed_setup reads of an Accelerator: its strategy and the plugin's settings."""
    state = types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=fsdp_version),
                                  deepspeed_plugin=types.SimpleNamespace(zero_stage=zero_stage))
    return types.SimpleNamespace(distributed_type=kind, state=state, device=torch.device("cpu"))


def args(**kw):
    return types.SimpleNamespace(**{"use_lora": False, "use_adafactor": False, "ema_decay": None,
                                    "compile_sampler": "auto", "compile_unet": "off", "fp8_sampler": False, **kw})


def check_distributed_setup(accelerator, flags):
    """What a training script checks once its Run has the accelerator: the strategy itself, then the speed flags."""
    check_strategy(accelerator, flags)
    check_speed_args(flags, strategy_name(accelerator), unet_is_wrapped(accelerator), shards_parameters(accelerator),
                     accelerator.device)


def test_strategies_that_cannot_work_are_refused_naming_the_config_and_the_flag():
    check_distributed_setup(fake_accelerator(DistributedType.FSDP), args())  # full UNet under FSDP2: fine
    check_distributed_setup(fake_accelerator(DistributedType.DEEPSPEED), args(use_lora=True))
    check_distributed_setup(fake_accelerator(DistributedType.MULTI_GPU), args(use_lora=True, compile_sampler="default"))
    with pytest.raises(UsageError, match=r"fsdp_version: 1.*fsdp_version: 2 \(launchers/accelerate/fsdp.yaml\)"):
        check_distributed_setup(fake_accelerator(DistributedType.FSDP, fsdp_version=1), args())
    check_distributed_setup(fake_accelerator(DistributedType.FSDP), args(use_lora=True))  # LoRA under FSDP2: fine
    check_distributed_setup(fake_accelerator(DistributedType.DEEPSPEED), args(use_adafactor=True))
    with pytest.raises(UsageError, match=r"--use_adafactor under FSDP .*deepspeed_zero2.yaml"):
        check_distributed_setup(fake_accelerator(DistributedType.FSDP), args(use_adafactor=True))
    with pytest.raises(UsageError, match=r"zero_stage: 3"):
        check_distributed_setup(fake_accelerator(DistributedType.DEEPSPEED, zero_stage=3), args())
    with pytest.raises(UsageError, match=r"--compile_sampler default .* FSDP2"):
        check_distributed_setup(fake_accelerator(DistributedType.FSDP), args(compile_sampler="default"))
    check_distributed_setup(fake_accelerator(DistributedType.MULTI_GPU), args(compile_unet="default"))
    for kind, name in ((DistributedType.FSDP, "FSDP2"), (DistributedType.DEEPSPEED, "DeepSpeed ZeRO-2")):
        with pytest.raises(UsageError, match=rf"--compile_unet default works with one process or DDP, not with {name}"):
            check_distributed_setup(fake_accelerator(kind), args(compile_unet="default"))
    check_distributed_setup(fake_accelerator(DistributedType.MULTI_GPU), args(fp8_sampler=True))
    for kind, name in ((DistributedType.FSDP, "FSDP2"), (DistributedType.DEEPSPEED, "DeepSpeed ZeRO-2")):
        with pytest.raises(UsageError, match=rf"--fp8_sampler works with one process or DDP, not with {name}"):
            check_distributed_setup(fake_accelerator(kind), args(fp8_sampler=True))
    # weights averaged outside the module (utils.ema.WeightAverage): not of FSDP2's sharded parameters
    check_distributed_setup(fake_accelerator(DistributedType.DEEPSPEED), args(ema_decay=0.999, method="nft"))
    with pytest.raises(UsageError, match=r"--ema_decay under FSDP .* DeepSpeed ZeRO-2"):
        check_distributed_setup(fake_accelerator(DistributedType.FSDP), args(ema_decay=0.999))
    with pytest.raises(UsageError, match=r"--method nft under FSDP .*deepspeed_zero2.yaml"):
        check_distributed_setup(fake_accelerator(DistributedType.FSDP), args(method="nft"))
    check_distributed_setup(fake_accelerator(DistributedType.FSDP), args(method="flow_grpo"))
    assert strategy_name(fake_accelerator(DistributedType.DEEPSPEED)) == "DeepSpeed ZeRO-2"


def test_deepspeed_input_cast_makes_the_reference_equal_the_model_at_the_start(tiny_sd_path):
    """Under DeepSpeed the UNet is bf16 and autocast is off: the forward pre-hook casts fp32 latents, and the LoRA
    model (adapter B = 0) and its reference (adapters off) then compute the same errors, so DPO starts at log 2."""
    from diffusers import UNet2DConditionModel

    from utils.models import adapters_disabled, add_lora
    from utils.train.distributed import cast_inputs_to

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    add_lora(unet, rank=4, seed=0)
    unet.to(torch.bfloat16).register_forward_pre_hook(cast_inputs_to(torch.bfloat16), with_kwargs=True)
    latents = torch.randn(2, 4, 8, 8)  # float32, as the training loops make them
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        model = unet(latents, t, encoder_hidden_states=text).sample
        with adapters_disabled(unet):
            reference = unet(latents, t, encoder_hidden_states=text).sample
        cast_by_hand = unet(latents.bfloat16(), t, encoder_hidden_states=text.bfloat16()).sample
    assert model.dtype == torch.bfloat16 and torch.equal(model, reference) and torch.equal(model, cast_by_hand)


FSDP2_LORA_STEP = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from utils.models import adapters_disabled, add_trainable_lora

dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
unet = add_trainable_lora(UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet"), 4, None, 0, "cpu",
                          torch.bfloat16)
policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)  # as fsdp.yaml under bf16
for block in [m for m in unet.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]:
    fully_shard(block, mp_policy=policy)
fully_shard(unet, mp_policy=policy)
x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
text = torch.randn(2, 77, unet.config.cross_attention_dim)
with torch.autocast("cpu", dtype=torch.bfloat16):
    with torch.no_grad(), adapters_disabled(unet):  # FSDP2's first forward: the reference's, as in train_dpo.py
        reference = unet(x, t, encoder_hidden_states=text).sample
    model = unet(x, t, encoder_hidden_states=text).sample
(model.float() - reference.float()).square().mean().add(model.float().square().mean()).backward()
grads = [p.grad for p in unet.parameters() if p.requires_grad]
assert grads and all(g is not None and g.dtype == torch.float32 for g in grads), {getattr(g, "dtype", None) for g in grads}
print("ok", len(grads))
"""


def test_fsdp2_lora_gradients_reach_the_fp32_adapters_when_the_reference_runs_first(tiny_sd_path):
    """FSDP2 (torch's fully_shard, on the CPU with gloo: accelerate would turn the config into DDP here) around a bf16
    UNet with fp32 LoRA adapters, the policy of launchers/accelerate/fsdp.yaml. FSDP2 picks its gradient dtypes at its
    first forward; in train_dpo.py that is the reference's, with the adapters off. peft's switch leaves the adapters
    without requires_grad there; FSDP2 would then see no trainable weight and hand bf16 gradients to the fp32
    adapters ("attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float").
    utils.models.adapters_disabled keeps requires_grad as it was."""
    proc = run_command([sys.executable, "-c", FSDP2_LORA_STEP, tiny_sd_path, free_port()], 300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_weights_written_from_a_gathered_state_dict_load_in_stock_diffusers(tiny_sd_path, tmp_path):
    """Under FSDP the main process writes the UNet from the state dict all processes gathered (its own parameters
    are shards): unet/ and the LoRA file must then load as any other output does."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from utils.models import add_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    gathered = {k: v + 0.01 for k, v in unet.state_dict().items()}  # differs from the module's own weights
    save_unet_weights(unet, str(tmp_path / "full"), is_sdxl=False, state_dict=gathered)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "full", subfolder="unet")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in gathered.items())

    add_lora(unet, rank=4, seed=0)
    gathered = {k: torch.full_like(v, 0.5) if "lora_B" in k else v for k, v in unet.state_dict().items()}
    save_unet_weights(unet, str(tmp_path / "lora"), is_sdxl=False, state_dict=gathered)
    state, _ = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "lora"))
    lora_b = [v for k, v in state.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and all(torch.all(v == 0.5) for v in lora_b)  # the gathered values, not the module's zeros


def slurm_env(**kw):
    return {**os.environ, "SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "node07,node08,node09,node10",
            "SLURM_JOB_ID": "123456", "GPUS_PER_NODE": "8", "DRY_RUN": "1", **kw}


def test_slurm_node_command_takes_rank_address_and_port_from_the_slurm_environment():
    env = slurm_env()
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not os.path.exists(os.path.join(p, "scontrol")))
    proc = run_command(["bash", NODE, "train_dpo.py", "--dataset_name", "my data"], 30, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    out = shlex.split(out)  # printed with %q, so that it can be pasted into a shell
    flag = {name: out[out.index(name) + 1] for name in ("--num_machines", "--machine_rank", "--num_processes",
                                                         "--main_process_ip", "--main_process_port", "--config_file")}
    assert flag == {"--num_machines": "4", "--machine_rank": "2", "--num_processes": "32", "--main_process_ip": "node07",
                    "--main_process_port": str(29500 + 123456 % 1000), "--config_file": "launchers/accelerate/ddp.yaml"}
    assert out[-3:] == ["train_dpo.py", "--dataset_name", "my data"]  # the script's flags follow, quoted
    sbatch = (REPO_ROOT / "launchers" / "slurm" / "train.sbatch").read_text()
    assert "--requeue" in sbatch and "--signal=B:USR1@" in sbatch and "--resume_from_checkpoint latest" in sbatch


def test_two_cpu_processes_through_the_slurm_entry_point_match_one(tmp_path):
    from tests.test_draftp import draftp_flags, run_draftp

    one, two = tmp_path / "one", tmp_path / "two"
    run_draftp(draftp_flags(one, steps=1, extra=["--train_batch_size", 2]))  # the reference: one process, in this one
    # one node with 2 CPU processes (gloo): accelerate runs several CPU processes through its multi-GPU launcher
    # when ACCELERATE_USE_CPU is set
    env = slurm_env(SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="127.0.0.1", GPUS_PER_NODE="2", DRY_RUN="0",
                    ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", SLURM_JOB_ID=str(os.getpid()))
    flags = [str(f) for f in draftp_flags(two, steps=1, extra=["--train_batch_size", 1, "--mixed_precision", "no"])]
    proc = run_command(["bash", NODE, *flags], 600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes 2 x batch 1" in proc.stderr
    first_one, first_two = read_metrics(one)[0], read_metrics(two)[0]
    # the same global batch of 2 prompts and noises; only the float32 sum order of the reward mean differs
    assert first_two["loss"] == pytest.approx(first_one["loss"], rel=1e-5)
