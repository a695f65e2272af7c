"""The accelerator and the distributed strategies (one process, DDP, DeepSpeed ZeRO-2, FSDP2) that
`accelerate config` picks: what each can train, and how the model is prepared for it."""
import logging

import torch

from .. import UsageError

logger = logging.getLogger(__name__)


def strategy_name(accelerator) -> str:
    """'DDP', 'FSDP2', 'DeepSpeed ZeRO-2', ... for logs and errors."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return {DistributedType.NO: "one process"}.get(kind, "DDP")


def shards_parameters(accelerator) -> bool:
    """True where the trained UNet's weights are split across processes (FSDP; ZeRO-3 is refused at start): every
    process must then take part in each of its forward passes and in gathering its state dict."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def unet_is_wrapped(accelerator) -> bool:
    """FSDP and DeepSpeed take the UNet over (sharding or casting its weights, which must then be contiguous);
    DDP and one process leave the module as it is."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def check_distributed_setup(accelerator, args):
    """Refuse, before any model is loaded, the strategies that cannot train these models. (Flags that only some
    strategies allow are checked where they are defined, e.g. utils.speed.check_speed_args.)"""
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    # An average of the trained weights (utils.ema.WeightAverage) holds the module's parameters as they were before
    # accelerate.prepare; FSDP2 replaces them with sharded ones, so the average would follow weights nothing trains
    # and swap into weights nothing reads: a silently wrong average (NFT's old policy would be the trained model).
    if fsdp and args.ema_decay is not None:
        raise UsageError("--ema_decay under FSDP (launchers/accelerate/fsdp.yaml) is not supported: the average is kept "
                         "of whole weights, which FSDP shards; use DDP or DeepSpeed ZeRO-2, or drop --ema_decay")
    if fsdp and getattr(args, "method", None) == "nft":
        raise UsageError("--method nft under FSDP (launchers/accelerate/fsdp.yaml) is not supported: its old policy is "
                         "an average of whole weights, which FSDP shards; use DDP (launchers/accelerate/ddp.yaml) or "
                         "DeepSpeed ZeRO-2 (launchers/accelerate/deepspeed_zero2.yaml)")
    if fsdp and args.use_adafactor:
        # Measured on an H200: transformers' Adafactor mixes its factored row/column statistics (plain tensors) with
        # FSDP2's sharded gradients (DTensors) and fails at the first step; a row mean over a shard is not Adafactor.
        raise UsageError("--use_adafactor under FSDP (launchers/accelerate/fsdp.yaml) is not supported: its factored "
                         "statistics need whole weight matrices; use AdamW (drop --use_adafactor) under FSDP, or "
                         "Adafactor with launchers/accelerate/deepspeed_zero2.yaml or ddp.yaml")
    if fsdp and accelerator.state.fsdp_plugin.fsdp_version != 2:
        # FSDP1 flattens each wrapped module's weights into one tensor of one dtype: a frozen bf16 UNet beside fp32
        # LoRA weights cannot be flattened, and a frozen reference called outside the root wrapper breaks it.
        raise UsageError("the accelerate config sets fsdp_version: 1, which cannot train these models; use "
                         "fsdp_version: 2 (launchers/accelerate/fsdp.yaml)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise UsageError("the accelerate config sets DeepSpeed zero_stage: 3, which this project does not support "
                         "(its frozen LoRA reference and sampler call the UNet outside the engine); use ZeRO-2 "
                         "(launchers/accelerate/deepspeed_zero2.yaml) or FSDP2 (launchers/accelerate/fsdp.yaml)")


def prepare_for_training(accelerator, args, unet, optimizer, lr_scheduler, frozen_unet=None):
    """accelerator.prepare, after telling DeepSpeed what it cannot learn from a prepared data loader (the
    scripts draw their own batches) and what accelerate would otherwise fill in with its own defaults
    (gradient clipping 1.0 whatever --max_grad_norm says)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=args.train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            train_batch_size=args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
            gradient_clipping=args.max_grad_norm,
            zero_allow_untested_optimizer=True,  # Adafactor and 8-bit AdamW are not on ZeRO's list of tested ones
        )
        # The engine casts the UNet to bf16/fp16 and runs its forward with autocast switched off (accelerate's
        # autocast is a no-op under DeepSpeed): floating inputs (fp32 latents and noise) must arrive in the weights'
        # dtype. The frozen copy gets the same hook and no autocast either, so that the reference computes exactly
        # what the trained UNet computes (DPO's first loss is log 2 only if the two agree bit for bit).
        for model in filter(None, (unet, frozen_unet)):
            model.register_forward_pre_hook(cast_inputs_to(compute_dtype(accelerator)), with_kwargs=True)
    if getattr(accelerator.state, "fsdp_plugin", None) is not None and accelerator.mixed_precision in ("fp16", "bf16"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # Compute in the mixed-precision dtype, but reduce gradients in fp32 as DDP does (accelerate's default
        # reduces them in bf16).
        dtype = compute_dtype(accelerator)
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=dtype)
    prepared = accelerator.prepare(unet, optimizer, lr_scheduler)
    if frozen_unet is not None and shards_parameters(accelerator):
        # The full-UNet reference sharded with the trained UNet's policy (in place; accelerate neither trains nor saves
        # it): both then compute from FSDP2's all-gathered bf16 weights, so that they agree at step 0. An unsharded
        # copy gave DPO's first loss 0.702 instead of log 2 on an H200 (BENCHMARKS.md "Distributed"). It also divides
        # the reference's memory by the number of processes.
        from accelerate.utils import fsdp2_prepare_model

        fsdp2_prepare_model(accelerator, frozen_unet)
    return prepared


def cast_inputs_to(dtype: torch.dtype):
    """A forward pre-hook that casts the floating-point tensors among a module's inputs (nested in dicts, e.g.
    SDXL's added_cond_kwargs) to `dtype`."""
    def cast(value):
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value

    def hook(module, args, kwargs):
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook


def full_state_dict(accelerator, model):
    """The whole state dict of a UNet whose weights are sharded (a collective: every process must call it), or
    None where each process holds the whole model and the model itself can be saved."""
    return accelerator.get_state_dict(model) if shards_parameters(accelerator) else None


def check_mixed_precision(accelerator):
    """fp16 on a CPU: accelerate turns autocast off there, so fp16 frozen models would meet fp32 inputs in the
    first forward pass (a dtype-mismatch traceback after every model has loaded). Say so before loading."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UsageError("--mixed_precision fp16 (or fp16 in `accelerate config`) needs a GPU, and this run is on the "
                         "CPU; pass --mixed_precision bf16 or no")


def compute_dtype(accelerator) -> torch.dtype:
    """dtype of the frozen parts: the mixed-precision dtype (trainable weights stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
