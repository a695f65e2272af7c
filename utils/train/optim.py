"""Optimizer, learning-rate schedule, and the update at the end of an accumulation (clipping, non-finite skip)."""
import torch

from .. import UsageError


LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def scaled_learning_rate(args, num_processes: int) -> float:
    """--scale_lr as the diffusers examples and Diffusion-DPO define it: lr x GPUs x batch x accumulation."""
    if not args.scale_lr:
        return args.learning_rate
    return args.learning_rate * num_processes * args.train_batch_size * args.gradient_accumulation_steps


def build_optimizer(args, params, learning_rate: float):
    params = [p for p in params if p.requires_grad]
    if args.use_adafactor:
        from transformers.optimization import Adafactor

        # Fixed lr (no relative step), as the Diffusion-DPO recipe uses Adafactor for the full SDXL UNet.
        return Adafactor(params, lr=learning_rate, weight_decay=args.adam_weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or pip install -r "
                             "requirements-extra.txt)") from None
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def build_lr_scheduler(args, optimizer, updates_per_step: int = 1):
    """The schedule over optimizer updates (--max_train_steps steps of `updates_per_step` updates each). It is
    stepped once per update whatever the number of processes (the Accelerator is made with
    step_scheduler_with_optimizer=False), so a checkpoint's schedule means the same when a run resumes on another
    number of processes."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * updates_per_step,
                         num_training_steps=args.max_train_steps * updates_per_step)


def optimizer_update(accelerator, args, model, optimizer, lr_scheduler, skipped: bool, nonfinite_loss=None):
    """The update at the end of an accumulation: clip, then step unless the loss or the gradient was not finite.

    The gradient norm is computed even with clipping off (max norm inf: the gradients are multiplied by 1), so a
    finite loss with an infinite gradient skips the step (on every process: its flag is all-reduced) instead of
    writing inf into the weights. `nonfinite_loss`: NonFiniteGuard's deferred flag (a device tensor, any loss of
    the accumulation not finite), checked in the same host sync as the gradient. Returns (grad_norm, skipped)."""
    from accelerate.utils import DistributedType

    grad_norm = torch.zeros((), device=accelerator.device)
    if not skipped:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            norm = model.get_global_grad_norm()  # the engine clipped (--max_grad_norm) and stepped in backward
        else:
            norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2's norm of sharded gradients is a DTensor
            norm = norm.full_tensor()
        grad_norm = grad_norm if norm is None else torch.as_tensor(norm, device=accelerator.device).float()
        if accelerator.scaler is None:  # fp16's GradScaler skips overflowing steps itself, and must see them to
            # lower its scale (a few at the start are normal), so only unscaled runs check here
            bad = (~torch.isfinite(grad_norm).all()).float()  # on the device: the .item() below is the one sync
            if nonfinite_loss is not None:
                bad = torch.maximum(bad, nonfinite_loss.float())
            skipped = accelerator.reduce(bad, reduction="sum").item() > 0
        if not skipped:
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16's GradScaler skipped an overflowing step: so does the schedule
                lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped
