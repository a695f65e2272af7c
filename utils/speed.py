"""Speed and memory options of the sampling chain: each keeps the results equal (to bf16 rounding) and has a
flag that turns it off. Measured on an H100 in bench/bench.py; numbers and what did not help in BENCHMARKS.md.

- channels-last (NHWC) UNet and VAE: cuDNN's bf16 convolutions run in NHWC; NCHW tensors are transposed
  around every convolution.
- torch.compile of the UNet for the sampling steps without grad (all but the last K of DRaFT), by default in
  "reduce-overhead" mode: CUDA graphs replay the ~1000 kernels of a UNet call without the host launching
  each (on the H100 the eager and the default-mode compiled loops were bound by the host: batch 4 sampled
  no faster than batch 8), and inductor fuses the GroupNorm / SiLU / residual work between the matrix
  products. The steps with grad and the frozen reference keep the eager UNet (LoRA adapters switched off
  and on, gradient checkpointing).
- VAE decoder gradient checkpointing: the decode with grad of a 512 px image stores GBs of activations
  per image; recomputing them costs one more decoder forward.

- inductor's compile cache kept across runs (`keep_compile_cache`): the first step of a cold run pays the
  compilation, a warm cache replays it in a fraction of that time.

Not here, and why: fused QKV projections (`unet.fuse_qkv_projections()`) replace to_q/to_k/to_v by one
to_qkv with the base weights only, so LoRA adapters on those projections would be silently dropped.
"""
import argparse
import os
from typing import Callable, Optional

import torch

from . import UsageError
from .fp8 import check_float8_device

COMPILE_MODES = ["auto", "off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]
# Compiling the training UNet's forward: backward runs through it, so no CUDA graphs ("reduce-overhead" would replay
# captured buffers that the saved activations of a pending backward still point to).
TRAIN_COMPILE_MODES = ["off", "default", "max-autotune-no-cudagraphs"]
# Where inductor keeps compiled graphs unless the user says otherwise: torch's default is /tmp/torchinductor_$USER,
# which many clusters and fresh machines wipe, so every run would pay the full compilation again.
COMPILE_CACHE_DIR = os.path.join("~", ".cache", "diffusion-align", "inductor")


def keep_compile_cache(environ=os.environ) -> str:
    """Point inductor's caches (compiled graphs, AOTAutograd, autotuning) at COMPILE_CACHE_DIR unless
    TORCHINDUCTOR_CACHE_DIR is set, and keep the FX graph cache on unless TORCHINDUCTOR_FX_GRAPH_CACHE is set.
    Must run before the first torch.compile; returns the folder."""
    environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser(COMPILE_CACHE_DIR))
    environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return environ["TORCHINDUCTOR_CACHE_DIR"]


def add_speed_args(parser: argparse.ArgumentParser, sampling: bool = True):
    """The speed flags; sampling=False: the training-step ones (train_dpo.py samples no images while training)."""
    g = parser.add_argument_group("speed (results stay equal to bf16 rounding; BENCHMARKS.md has the numbers)")
    what = "the UNet" if sampling else "the UNet (and a full UNet's frozen reference copy)"
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help=f"keep {what} in channels-last (NHWC) memory format, which cuDNN's bf16 convolutions use. "
                        "The VAE stays NCHW either way: its GroupNorms would copy channels-last activations to NCHW "
                        "and back")
    g.add_argument("--defer_loss_check", action=argparse.BooleanOptionalAction, default=True,
                   help="check the loss for NaN/inf once per optimizer step, with the gradient norm, instead of waiting "
                        "for the GPU after every micro-step's forward (one process without fp16 or DeepSpeed; "
                        "elsewhere it is checked per micro-step). A non-finite loss still skips its update")
    at = " at the steps with grad (the no-grad sampling steps: --compile_sampler)" if sampling else ""
    drift = ("the KL at step 1 is not exactly 0" if sampling else
             "beta multiplies that, so the first loss is log 2 only to about 1e-4")
    g.add_argument("--compile_unet", default="off", choices=TRAIN_COMPILE_MODES,
                   help=f"torch.compile mode of the trained UNet's forward{at}; backward follows through AOTAutograd. "
                        "One process or DDP only. The first step pays the compilation (cached across runs, README "
                        f"'Start-up'). Inductor's kernels round differently from the eager reference model: {drift}")
    if not sampling:
        return
    g.add_argument("--compile_sampler", default="auto", choices=COMPILE_MODES,
                   help="torch.compile mode of the UNet for the sampling steps without grad; 'auto' = 'reduce-overhead' "
                        "(CUDA graphs) on a CUDA GPU and 'off' elsewhere. The first step pays the compilation (cached "
                        "across runs)")
    g.add_argument("--vae_gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute the VAE decoder's activations in backward (saves GBs per 512 px image)")
    g = parser.add_argument_group("speed, changing results")
    g.add_argument("--fp8_sampler", action="store_true",
                   help="run the transformer projections (attention, feed-forward) of the sampling steps without grad "
                        "as FP8 matrix products with row-wise scales (utils/fp8.py; GPUs of compute capability 8.9+: "
                        "Ada, Hopper). CHANGES RESULTS: x_K differs by FP8 rounding (BENCHMARKS.md has the image "
                        "difference); the steps with grad, the reference (KL), the VAE and the reward keep the compute "
                        "dtype. One process or DDP only. Not a speed-up on SD1.5 (BENCHMARKS.md): quantizing the "
                        "activations costs more than the FP8 products save")


# Speed flags change no number of a step (to bf16 rounding): a resume may change them.
SAFE_TO_CHANGE_ON_RESUME = frozenset({"channels_last", "compile_sampler", "vae_gradient_checkpointing",
                                      "defer_loss_check", "compile_unet"})


def check_speed_args(args, strategy: str, wraps_model: bool, shards_model: bool, device):
    """Refuse the speed flags that the distributed strategy cannot honour (before any model is loaded).
    `wraps_model`: FSDP or DeepSpeed takes the model over; `shards_model`: FSDP splits its weights."""
    if args.compile_unet != "off" and wraps_model:
        raise UsageError(f"--compile_unet {args.compile_unet} works with one process or DDP, not with {strategy}: "
                         f"drop it")
    if getattr(args, "fp8_sampler", False):  # the sampling flags exist where add_speed_args(sampling=True) added them
        if wraps_model:
            raise UsageError(f"--fp8_sampler works with one process or DDP, not with {strategy}: drop it")
        check_float8_device(device)
    if getattr(args, "compile_sampler", "off") not in ("auto", "off") and shards_model:
        raise UsageError(f"--compile_sampler {args.compile_sampler} cannot compile a UNet that {strategy} shards; pass "
                         f"--compile_sampler off (or auto, which is off under FSDP and DeepSpeed)")


def compile_training_unet(unet, mode: str, backend: str = "inductor"):
    """--compile_unet: the trained UNet (or its DDP wrapper) compiled for the training forward, or the UNet itself
    when off. The parameters are shared, so the optimizer, checkpoints and the eager reference see the same weights."""
    if mode == "off":
        return unet
    # dynamic=False: the batch is fixed during training, so one static graph without shape guards
    return torch.compile(unet, mode=None if mode == "default" else mode, dynamic=False, backend=backend)


def compile_mode(requested: str, device) -> Optional[str]:
    """The torch.compile mode to use, or None for eager."""
    if requested == "auto":
        return "reduce-overhead" if torch.device(device).type == "cuda" else None
    return None if requested == "off" else requested


def apply_speed_options(args, unet, vae, device, backend: str = "inductor", plain_unet: bool = True) -> Optional[Callable]:
    """Apply the memory-format and checkpointing options in place; return the UNet to call for the sampling
    steps without grad (a compiled view sharing the UNet's parameters), or None to use the UNet itself.

    Without grad no DDP synchronisation is needed, so the compiled view may bypass the DDP wrapper.
    plain_unet=False: FSDP or DeepSpeed will wrap the UNet (`unet_is_wrapped`); both need contiguous (NCHW)
    weights, and FSDP's sharded weights must go through its hooks, so the UNet stays NCHW and
    --compile_sampler auto means off.
    """
    # channels-last is a 4-D layout: a video transformer (Wan's Conv3d patch embedding) keeps its own
    if args.channels_last and plain_unet and all(p.dim() != 5 for p in unet.parameters()):  # not the VAE: see --channels_last
        unet.to(memory_format=torch.channels_last)
    # Wan's video VAE has none (diffusers raises): the video reward checkpoints its decode itself (utils/wan_decode.py)
    if args.vae_gradient_checkpointing and vae._supports_gradient_checkpointing:
        vae.enable_gradient_checkpointing()  # diffusers' decoder checks torch.is_grad_enabled(), not .training
    return compiled_sampler(args, unet, device, backend, plain_unet)


def sampling_model(args, unet, device, backend: str = "inductor") -> Callable:
    """What the no-grad steps call for `unet`: its compiled view (--compile_sampler) or `unet` itself."""
    compiled = compiled_sampler(args, unet, device, backend)
    return unet if compiled is None else compiled  # not `or`: a compiled module refuses bool() (it defines __len__)


def compiled_sampler(args, unet, device, backend: str = "inductor", plain_unet: bool = True) -> Optional[Callable]:
    """`unet` compiled as --compile_sampler says (a view sharing its parameters), or None for eager."""
    mode = compile_mode(args.compile_sampler, device)
    if not plain_unet and args.compile_sampler == "auto":
        mode = None
    if mode is None:
        return None
    # dynamic=False: the batch is fixed during training, so one static graph without shape guards.
    return torch.compile(unet, mode=None if mode == "default" else mode, dynamic=False, backend=backend)
