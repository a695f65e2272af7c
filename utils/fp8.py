"""The opt-in FP8 sampler (`--fp8_sampler`): the no-grad sampling steps of DRaFT / DRaFT+ with the UNet's transformer
projections (attention q, k, v, out and the feed-forward layers) run as FP8 matrix products. It CHANGES RESULTS:
float8 e4m3 keeps 3 mantissa bits, so each operand is rounded by up to 1/16 of itself before the sums over the inner
dimension average the errors down; BENCHMARKS.md has the measured image difference against the bf16 sampler. The
steps with grad, the reference model (the KL term), the VAE and the reward stay in the compute dtype.

Recipe ("row-wise" scaling, as torchao's PerRow): each output channel of a weight and each token of an activation gets
its own float32 scale, amax / 448 (e4m3's largest value), and `torch._scaled_mm` multiplies the float8 operands
with the scales applied to its float32 accumulator. Weight scales are computed once (`refresh` recomputes them after an
optimizer step changes a full UNet's weights); activation scales per call.

The FP8 model is a copy of the UNet's module tree that shares every parameter and buffer with it, so the LoRA adapters
being trained apply in the FP8 sampler too (in the compute dtype, on top of the FP8 base product); only the replaced
projections hold extra memory, their float8 weights. Not torchao's `quantize_`: it converts modules in place (the
steps with grad and the reference must keep the bf16 weights) and refuses to run off a CUDA GPU, while
`torch._scaled_mm` also runs on the CPU, where the tests check this module.

Why these layers only: PyTorch has FP8 matrix products but no FP8 convolution or attention kernels; the projections
are about a fifth of a sampling step's GPU time on SD1.5 (BENCHMARKS.md, its profile), the convolutions and attention
the most of it.
"""
import copy
import itertools

import torch
from torch import nn

from . import UsageError

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448
# torch._scaled_mm needs both dimensions of the weight to be multiples of 16
ALIGNMENT = 16
# where the projections live: the transformer blocks' attention and feed-forward layers (SD1.5 / SDXL UNets:
# down_blocks.*.attentions.*.transformer_blocks.*; SD3 / FLUX: transformer_blocks.*, single_transformer_blocks.*)
TRANSFORMER_BLOCKS = ("transformer_blocks", "single_transformer_blocks")


def quantize_rows(x: torch.Tensor):
    """x (M, K) -> (float8 (M, K), float32 scales (M, 1)) with x ~ float8 * scale, row by row."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FLOAT8_MAX
    return (x.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


class Float8Linear(nn.Module):
    """A no-grad stand-in for `source` (an nn.Linear): y = x W^T + b from float8 x and W with row-wise scales."""

    def __init__(self, source: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight, self.bias = source.weight, source.bias  # shared Parameters: what refresh() reads, peft's dtype checks
        weight_fp8, weight_scale = quantize_rows(source.weight.detach())
        self.register_buffer("weight_fp8", weight_fp8, persistent=False)
        self.register_buffer("weight_scale", weight_scale.t().contiguous(), persistent=False)  # (1, N)

    @torch.no_grad()
    def refresh(self):
        """Re-quantize from the shared weight, in place (a CUDA graph of the sampler keeps reading the same memory)."""
        weight_fp8, weight_scale = quantize_rows(self.weight.detach())
        self.weight_fp8.copy_(weight_fp8)
        self.weight_scale.copy_(weight_scale.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        # CUDA's row-wise kernels write bf16 only; fast accumulation as torchao's FP8 inference default
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        y = torch._scaled_mm(x_fp8.contiguous(), self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             out_dtype=out_dtype, use_fast_accum=True).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def convertible(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.in_features % ALIGNMENT == 0
            and module.out_features % ALIGNMENT == 0)


def projection_names(unet: nn.Module) -> list:
    """Names of the nn.Linear layers the FP8 sampler replaces: inside the transformer blocks, with both sizes multiples
    of 16; not LoRA's own A / B matrices, and not the adaptive norms' modulation layers of SD3 / FLUX (norm1.linear
    and the like: a few rows each, so nothing to gain, and their scale and shift act on the whole block)."""
    names = []
    for name, module in unet.named_modules():
        parts = name.split(".")
        if (convertible(module) and any(p in TRANSFORMER_BLOCKS for p in parts)
                and not any(p.startswith("lora_") or p.startswith("norm") for p in parts)):
            names.append(name)
    return names


def float8_sampling_unet(unet: nn.Module) -> nn.Module:
    """A copy of `unet` (LoRA adapters included) sharing all its parameters and buffers, with the transformer
    projections replaced by Float8Linear. Call `refresh_float8_weights` after the shared weights change."""
    shared = {id(t): t for t in itertools.chain(unet.parameters(), unet.buffers())}
    fp8_unet = copy.deepcopy(unet, memo=shared)
    names = projection_names(fp8_unet)
    if not names:
        raise UsageError(f"--fp8_sampler: {type(unet).__name__} has no transformer projections to run in FP8 "
                         f"(nn.Linear layers under {' or '.join(TRANSFORMER_BLOCKS)})")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = fp8_unet.get_submodule(parent_name)
        setattr(parent, child, Float8Linear(getattr(parent, child)))
    return fp8_unet


def refresh_float8_weights(fp8_unet: nn.Module) -> None:
    """Re-quantize the FP8 weights whose bf16 source is trained (a full UNet after an optimizer step); with LoRA the
    base weights are frozen and nothing is recomputed."""
    for module in fp8_unet.modules():
        if isinstance(module, Float8Linear) and module.weight.requires_grad:
            module.refresh()


def check_float8_capability(capability, name: str) -> None:
    """FP8 matrix products need compute capability 8.9 (Ada, Hopper) or newer on a CUDA GPU."""
    if tuple(capability) < (8, 9):
        raise UsageError(f"--fp8_sampler needs FP8 matrix products, compute capability 8.9 or newer (Ada, Hopper); "
                         f"{name} has {capability[0]}.{capability[1]}: drop --fp8_sampler")


def check_float8_device(device) -> None:
    """Refuse a CUDA GPU without FP8 matrix products; the CPU runs them too (slowly: what the tests use)."""
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 5):
        raise UsageError(f"--fp8_sampler needs torch 2.5 or newer (row-wise scaled FP8 products); this is torch "
                         f"{torch.__version__}: upgrade torch or drop --fp8_sampler")
    device = torch.device(device)
    if device.type == "cuda":
        check_float8_capability(torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
