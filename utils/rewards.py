"""Scoring models ("rewards"), built by name from one registry.

One interface for every scorer (a frozen ``torch.nn.Module``)::

    scorer = load_reward("pickscore", device="cuda", dtype=torch.float16)
    r = scorer(images, prompts)            # (B,) float32; images (B,3,H,W) float in [0,1], any H,W;
                                           # differentiable w.r.t. the images (reward backprop)
    s = scorer.score(pil_images, prompts)  # list[float]; no grad; batched (``scorer.batch_size``); runs the
                                           # model's OWN processor on the PIL images (AI feedback, evaluation)
    total, parts = scorer.parts(images, prompts)   # parts: {name: (B,) unweighted reward}
    scorer = load_reward("pickscore:1.0,aesthetic:0.05", paths={"pickscore": "/models/pickscore"})

Names (``list_rewards()``):

- ``pickscore``: PickScore (yuvalkirstain/PickScore_v1, processor from laion/CLIP-ViT-H-14-laion2B-s32B-b79K);
  ``logit_scale.exp() * cos(image_embeds, text_embeds)``, as PickScore's own inference code computes it.
- ``clip``: CLIP score with openai/clip-vit-large-patch14: ``100 * cos(image_embeds, text_embeds)``. This is
  torchmetrics' CLIPScore without its clamp at 0 (the clamp would zero the gradient of poorly matching images);
  the fixed 100 (not the model's logit_scale) keeps the number comparable across CLIP checkpoints.
- ``clip_h14``: Diffusion-DPO's CLIP judge (its ``utils/clip_utils.py``, train_dpo.py's ``--choice_model clip``):
  open_clip ViT-H-14 with the laion2B-s32B-b79K weights (hub repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
  ``open_clip_pytorch_model.bin``), preprocessed as HPSv2 (resize the longest side to 224, pad with black, OpenAI
  mean/std); score = ``cos(image_features, text_features)``, in [-1, 1] (no factor 100), as their
  ``image_features @ text_features.T``.
- ``aesthetic``: LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``): an MLP 768-1024-128-64-16-1
  without activations (dropouts at indices 1, 3, 5, so the state dict holds ``layers.{0,2,4,6,7}``) on the
  L2-normalised CLIP ViT-L/14 image embedding (openai/clip-vit-large-patch14). The prompt is ignored.
- ``hpsv2`` / ``hpsv2.1``: Human Preference Score v2 / v2.1: the checkpoints HPS_v2_compressed.pt /
  HPS_v2.1_compressed.pt of hub repo xswu/HPSv2 on an open_clip ViT-H-14, loaded through open-clip-torch (not the
  ``hpsv2`` package). Score = ``image_features . text_features`` (both normalised), as HPSv2's ``img_score.py``;
  its processor resizes the longest side and pads with black (HPSv2 scores with ``light_augmentation=True``).
- ``toyclip`` (registered by the toy world's plugin, ``utils/toy``): a small CLIP trained contrastively on the toy
  world's captioned images, committed in ``utils/toy/assets/toyclip``; scored as PickScore (``logit_scale.exp() * cos``).
  It rates how well a 64 px image fits a toy-world prompt ("two red circles on the left").
- weight-free, no download, any image size, differentiable: ``brightness`` (mean Rec.601 luma, in [0,1]),
  ``saturation`` (mean chroma max(R,G,B) - min(R,G,B), in [0,1]) and ``color_match`` (prompt-aware: 1 minus
  the mean distance of the pixels to the RGB prototype of the first colour word in the prompt, in [0,1];
  prompts without a colour word score 0 and give no gradient).
- no gradient (``score`` only; see "Rewards without a gradient" below): ``jpeg_incompressibility`` /
  ``jpeg_compressibility`` (DDPO's first tasks: plus / minus the size in kB, bytes / 1000, of the image saved by
  PIL as JPEG at quality 95, as ddpo-pytorch's ``ddpo_pytorch/rewards.py`` computes it), ``http`` (a reward server,
  protocol below), and ``toyworld_judge`` (registered by the toy world's plugin: 1.0 when the count, colour and
  shape that the prompt names are all read back from the pixels, else 0.0).

Left out: ``imagereward``. ImageReward is BLIP (a ViT-L plus a BERT text encoder with cross-attention) whose
code lives only in the ``image-reward`` package, which pins timm 0.6.13 and fairscale; running its checkpoint
without that package means copying BLIP in or mapping ImageReward.pt onto transformers' BLIP classes, a mapping
that cannot be checked against the real checkpoint without downloading it.

A scorer of your own: subclass ``Reward`` (or ``ScoreOnlyReward`` for one without a gradient) and register a builder
with ``register_reward`` in a plugin module (``utils/plugins.py``); ``--reward_model`` then takes its name.

Where the weights come from. Each learned scorer takes a local path instead of its hub id
(``model_name_or_path=`` for one name, ``paths={name: path}`` for a sum; the training scripts expose this as
``--reward_model_paths NAME=PATH``):

- ``pickscore`` / ``clip``: a folder holding a ``CLIPModel`` as ``save_pretrained`` writes it, plus its processor
  files (``CLIPProcessor.save_pretrained``); if the folder has no ``processor_config.json`` /
  ``preprocessor_config.json`` the default processor hub id is used.
- ``aesthetic``: a folder holding ``sac+logos+ava1-l14-linearMSE.pth`` (the MLP) and, optionally, the CLIP
  ViT-L/14 as ``save_pretrained`` writes it (``config.json`` + weights + processor files; without them the CLIP
  part comes from openai/clip-vit-large-patch14), or the ``.pth`` file itself. By default the MLP is fetched
  once from the improved-aesthetic-predictor GitHub repository into torch hub's cache (``torch.hub.get_dir()``).
- ``hpsv2`` / ``hpsv2.1`` / ``clip_h14``: the checkpoint file, or a folder holding it under its hub file name. An
  ``open_clip_config.json`` next to the checkpoint (open_clip's format: ``{"model_cfg": {...}}``) replaces the
  ViT-H-14 architecture (the tests use this for tiny models); ``load_hps(name, path, arch=, arch_config=)``
  does the same in code.

Nothing downloads when ``HF_HUB_OFFLINE=1``; missing weights raise ``UsageError`` naming what was looked for.
Without it, one request (``HUB_CHECK_TIMEOUT`` seconds at most) asks whether the hub answers before any hub id is
loaded: huggingface_hub retries each missing file five times with back-off (about 23 s a file, several files a
model) and has no setting for the count, so an unreachable hub means loading from the local cache only, and
weights missing there fail at once with the same one-line error.

Precision: ``load_reward(..., dtype=torch.bfloat16)`` runs the towers (vision and text transformers, their
projections) in that dtype and keeps the numerically sensitive parts in float32 whatever the scorer is moved to:
``logit_scale``, the aesthetic MLP head, and the final cosine (normalisation and dot product). In bf16,
exp(logit_scale) of PickScore would read 99.0 instead of 100 (``Reward.float32_parts``).

Differentiable path: ``__call__`` resizes (bicubic, antialias), crops or pads and normalises the image tensor in
torch exactly as the model's processor does on a PIL image (sizes, offsets, mean/std read from the processor).
The processor works on uint8 and rounds after each of its two resize passes, so the two agree to a few uint8
levels (max |difference| <= 0.05, mean <= 0.006 after normalisation, where one level is ~0.015; see
tests/test_rewards.py), and exactly when no resize is needed.

Rewards without a gradient. Online RL (Flow-GRPO, DiffusionNFT, DDPO: train_online.py) and evaluate.py need one
number per image and nothing else, so a scorer may be a file size, a pixel judge or a remote service.
``scorer.differentiable`` says which kind a scorer is (a ``WeightedSum`` is differentiable only if every part is);
a scorer without a gradient subclasses ``ScoreOnlyReward`` and gives ``score`` only: its ``__call__`` and ``parts``
raise a UsageError, because reward back-propagation (DRaFT, train_draftp.py) has nothing to back-propagate.
``register_reward(..., differentiable=False)`` records the kind with the builder, so that
``reward_is_differentiable(spec)`` / ``require_differentiable(spec, flag)`` decide it at argument-check time,
before any weights load.

The reward server protocol (``--reward_model http --reward_model_paths http=http://HOST:PORT/PATH``). The URL goes
through the NAME=PATH mapping that every script already takes for scoring models (train_draftp.py, evaluate.py,
train_dpo.py's --choice_model, train_online.py), so that no script needs a flag of its own and a weighted sum such as
``http:1.0,aesthetic:0.05`` works unchanged:

- request: ``POST URL`` with ``Content-Type: application/json`` and the body
  ``{"prompts": [str, ...], "images": [base64 PNG, ...]}`` (one prompt per image, RGB, at most
  ``HttpReward.batch_size`` images a request; a longer batch is sent as several requests in order);
- answer: status 200 and ``{"scores": [float, ...]}``, one finite number per image, in the request's order. Any
  other status counts as a failure; a JSON body ``{"error": "..."}`` is quoted in the client's error.
- An empty request (no prompts, no images) must answer ``{"scores": []}``: the client sends one when it is built, so
  a wrong URL or a server that is down fails before any image is drawn.
- Each request waits ``DIFFUSION_ALIGN_REWARD_TIMEOUT`` seconds (default 120) for the connection and for each read
  of the answer; a failed request (no connection, no answer in time, status 5xx / 408 / 429, a body that is not
  the answer above, a score that is not a finite number) is sent again up to ``DIFFUSION_ALIGN_REWARD_RETRIES``
  times (default 3) after 1, 2, 4, ... s (at most 30 s). Other 4xx answers are not retried (the request itself is
  wrong). When no attempt succeeds the client raises ``RewardServerError`` (a UsageError), one line naming the URL
  and the last failure: a reward is never replaced by a made-up value.
- ``python -m utils.reward_server --port 8000 --reward pickscore`` serves any registered reward this way; a server
  of your own (GenEval, OCR, a VLM judge) in its own environment needs only the JSON in and out.
"""
import base64
import functools
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from utils import UsageError
from utils.plugins import load_plugins

PATH_FLAG = "--reward_model_paths NAME=PATH"


def _path_flag(name: str) -> str:
    return f"--reward_model_paths {name}=PATH"


def hub_offline() -> bool:
    """True when the user asked for no network (``HF_HUB_OFFLINE=1``, the flag the HF libraries honour)."""
    return any(os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"} for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


HUB_CHECK_TIMEOUT = 5.0  # seconds: connect and answer time of the one request that decides whether the hub is used


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> Optional[str]:
    """Why the Hugging Face hub cannot be reached (e.g. "[Errno 111] Connection refused"), or None when it answers.

    One HEAD request to the endpoint (``HF_ENDPOINT``) through huggingface_hub's own HTTP session, asked once per
    process: any HTTP answer counts as reachable. Not asked with ``HF_HUB_OFFLINE=1``."""
    if hub_offline():
        return None
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT)
    except Exception as err:  # httpx's connect, DNS, TLS and timeout errors share no base class with OSError
        return str(err).strip() or type(err).__name__
    return None


def _local_files_only() -> bool:
    """Load hub ids from the local cache only: offline by request, or the hub does not answer."""
    return hub_offline() or hub_unreachable() is not None


# --------------------------------------------------------------------------- differentiable preprocessing
@dataclass(frozen=True)
class ImagePrep:
    """What a processor does to an image before the vision tower, so it can be redone in torch with gradients.

    ``resize_mode``: "shortest_edge" resizes the shortest side to the int ``resize`` and truncates the other
    (transformers' CLIPImageProcessor and torchvision ``Resize(int)``); "exact" resizes to ``resize`` = (h, w);
    "fit_longest" / "fit_shortest" scale, keeping the ratio, until the longest / shortest side fits (h, w),
    rounding the sides (open_clip's ``ResizeKeepRatio``). ``crop``: (h, w) of a center crop afterwards, padded
    with ``fill`` where the image is smaller. ``round_offsets``: torchvision rounds the crop offset,
    transformers floors it.
    """

    resize: Union[int, Tuple[int, int]]
    resize_mode: str
    crop: Optional[Tuple[int, int]]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    interpolation: str = "bicubic"
    round_offsets: bool = False
    fill: float = 0.0  # in [0,1], before normalisation

    @classmethod
    def from_clip_processor(cls, image_processor) -> "ImagePrep":
        """From a transformers ``CLIPImageProcessor`` (resize shortest edge, center crop, normalise)."""
        size, crop_size = dict(image_processor.size), dict(image_processor.crop_size)
        if size.get("shortest_edge"):
            resize, mode = size["shortest_edge"], "shortest_edge"
        else:
            resize, mode = (size["height"], size["width"]), "exact"
        crop = (crop_size["height"], crop_size["width"]) if image_processor.do_center_crop else None
        interpolation = {2: "bilinear", 3: "bicubic"}[int(image_processor.resample)]
        return cls(resize, mode, crop, tuple(image_processor.image_mean), tuple(image_processor.image_std), interpolation)

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict) -> "ImagePrep":
        """From an open_clip model's ``visual.preprocess_cfg`` (what its validation transform does)."""
        size = preprocess_cfg["size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        common = dict(
            mean=tuple(preprocess_cfg["mean"]), std=tuple(preprocess_cfg["std"]), round_offsets=True,
            interpolation=preprocess_cfg.get("interpolation", "bicubic"), fill=preprocess_cfg.get("fill_color", 0) / 255,
        )
        mode = preprocess_cfg.get("resize_mode", "shortest")
        if mode == "squash":
            return cls(hw, "exact", None, **common)
        if mode == "longest":
            return cls(hw, "fit_longest", hw, **common)
        # 'shortest' uses torchvision Resize(int) for a square target, ResizeKeepRatio otherwise.
        return cls(hw[0], "shortest_edge", hw, **common) if hw[0] == hw[1] else cls(hw, "fit_shortest", hw, **common)

    def resized_hw(self, h: int, w: int) -> Tuple[int, int]:
        if self.resize_mode == "exact":
            return tuple(self.resize)
        if self.resize_mode == "shortest_edge":
            s = self.resize
            return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        th, tw = self.resize
        pick = max if self.resize_mode == "fit_longest" else min
        ratio = pick(h / th, w / tw)
        return round(h / ratio), round(w / ratio)


def _center_crop_or_pad(x: torch.Tensor, hw: Tuple[int, int], round_offsets: bool, fill: float) -> torch.Tensor:
    ch, cw = hw
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pad_w, pad_h = max(cw - w, 0), max(ch - h, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=fill)
        h, w = x.shape[-2:]
    offset = (lambda d: int(round(d / 2))) if round_offsets else (lambda d: d // 2)
    top, left = offset(h - ch), offset(w - cw)
    return x[..., top : top + ch, left : left + cw]


def prepare_pixels(images: torch.Tensor, prep: ImagePrep) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> normalised (B,3,h,w) model input, differentiable. Computed in float32."""
    x = images.float()
    h, w = x.shape[-2:]
    new_hw = prep.resized_hw(h, w)
    if new_hw != (h, w):
        x = F.interpolate(x, size=new_hw, mode=prep.interpolation, antialias=True, align_corners=False)
        x = x.clamp(0, 1)  # the processor's uint8 output saturates the bicubic overshoot the same way
    if prep.crop is not None:
        x = _center_crop_or_pad(x, prep.crop, prep.round_offsets, prep.fill)
    mean = torch.tensor(prep.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image -> (3,H,W) float32 in [0,1]."""
    import numpy as np

    array = np.array(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


# --------------------------------------------------------------------------- the interface
class Reward(torch.nn.Module):
    """Base of every scorer: frozen, (B,) float32 out, ``parts`` and ``names`` for logging.

    Subclasses give ``pixels_from_tensor`` (differentiable preprocessing), ``pixels_from_pil`` (the model's own
    processor on PIL images) and ``_score_pixels`` (the model on preprocessed pixels). Scorers without a gradient
    subclass ``ScoreOnlyReward`` instead.
    """

    batch_size = 16
    differentiable = True  # __call__ gives a reward that back-propagates to the images (DRaFT needs this)
    takes_videos = False  # ``score`` takes whole videos (uint8 (F, H, W, 3) arrays), not images: a video judge

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    @property
    def names(self) -> List[str]:
        return [self.name]

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        return self.eval()

    def float32_parts(self) -> List[Union[torch.nn.Module, torch.nn.Parameter]]:
        """Modules / parameters that stay float32 whatever dtype the scorer is moved to (subclasses list them)."""
        return []

    def _apply(self, fn, recurse=True):
        # Every .to() / .half() / .bfloat16() ends here: the towers take the training dtype, the numerically
        # sensitive parts keep their float32 values (restored from before the cast: casting back after a round
        # trip through bf16 would keep the rounding). In bf16 exp(logit_scale) of PickScore reads 99.0 instead of
        # 100, and toyclip's scores come out 0.8 % high on matching toy-world images (tests/test_rewards.py).
        keep = [(t, t.data) for t in self._float32_tensors()]
        super()._apply(fn, recurse)
        for t, before in keep:
            t.data = before.to(device=t.device, dtype=torch.float32)
        return self

    def _float32_tensors(self) -> List[torch.Tensor]:
        tensors = []
        for part in self.float32_parts():
            if isinstance(part, torch.Tensor):
                tensors.append(part)
            else:
                tensors += [*part.parameters(), *part.buffers()]
        return tensors

    def train(self, mode: bool = True) -> "Reward":
        # Scorers are frozen: dropout (the aesthetic MLP has some) must never fire, whatever the caller does.
        return super().train(False)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(len(images), prompts)
        return self._score_pixels(self.pixels_from_tensor(images), list(prompts)).float()

    def parts(self, images: torch.Tensor, prompts: Sequence[str]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        r = self(images, prompts)
        return r, {self.name: r}

    @torch.no_grad()
    def score(self, pil_images: Sequence, prompts: Sequence[str]) -> List[float]:
        _check_batch(len(pil_images), prompts)
        out: List[float] = []
        for i in range(0, len(pil_images), self.batch_size):
            pixels = self.pixels_from_pil(list(pil_images[i : i + self.batch_size]))
            out += self._score_pixels(pixels, list(prompts[i : i + self.batch_size])).float().tolist()
        return out

    def pixels_from_tensor(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pixels_from_pil(self, pil_images: list) -> torch.Tensor:
        raise NotImplementedError

    def _score_pixels(self, pixels: torch.Tensor, prompts: List[str]) -> torch.Tensor:
        raise NotImplementedError


def _check_batch(n: int, prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or len(prompts) != n:
        raise ValueError(f"need one prompt per image: got {n} images and {'a str' if isinstance(prompts, str) else len(prompts)} prompts")


class WeightedSum(Reward):
    """sum_i w_i * reward_i; ``parts`` returns each reward unweighted so the training script can log it.

    Parts of both kinds mix: ``score`` sums every part's weighted score, while ``__call__`` / ``parts`` (the
    differentiable path) need every part to be differentiable and otherwise raise, naming the parts without one."""

    def __init__(self, scorers: Sequence[Reward], weights: Sequence[float]):
        super().__init__("+".join(f"{w:g}*{s.name}" for s, w in zip(scorers, weights)))
        # A list, not a ModuleDict: names such as "hpsv2.1" contain dots, which ModuleDict refuses.
        self.scorers = torch.nn.ModuleList(scorers)
        self.weights = dict(zip([s.name for s in scorers], [float(w) for w in weights]))

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.scorers]

    @property
    def differentiable(self) -> bool:
        return all(s.differentiable for s in self.scorers)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.parts(images, prompts)[0]

    def parts(self, images, prompts):
        if not self.differentiable:
            raise no_gradient_error([s.name for s in self.scorers if not s.differentiable], self.name)
        parts = {s.name: s(images, prompts) for s in self.scorers}
        total = sum(self.weights[name] * r for name, r in parts.items())
        return total, parts

    @torch.no_grad()
    def score(self, pil_images, prompts) -> List[float]:
        per_part = [[self.weights[s.name] * v for v in s.score(pil_images, prompts)] for s in self.scorers]
        return [math.fsum(vals) for vals in zip(*per_part)]


# --------------------------------------------------------------------------- weight-free rewards
class _PixelReward(Reward):
    """A reward computed from the pixels directly: no weights, no resize, any image size."""

    def pixels_from_tensor(self, images):
        return images

    @torch.no_grad()
    def score(self, pil_images, prompts) -> List[float]:
        # Images may differ in size, so no stacking; these rewards are cheap.
        _check_batch(len(pil_images), prompts)
        return [float(self(pil_to_tensor(im)[None], [p])[0]) for im, p in zip(pil_images, prompts)]


class Brightness(_PixelReward):
    """Mean Rec.601 luma in [0,1]."""

    def _score_pixels(self, pixels, prompts):
        luma = torch.tensor([0.299, 0.587, 0.114], device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        return (pixels * luma).sum(1).mean(dim=(1, 2))


class Saturation(_PixelReward):
    """Mean chroma, max(R,G,B) - min(R,G,B) per pixel, in [0,1]: grey images score 0, pure hues 1."""

    def _score_pixels(self, pixels, prompts):
        return (pixels.amax(1) - pixels.amin(1)).mean(dim=(1, 2))


# RGB prototypes in [0,1]: the CSS colour of each name (so "green" is CSS green, 0.5 in G).
COLORS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 0.5, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
    "orange": (1.0, 0.5, 0.0), "purple": (0.5, 0.0, 0.5), "pink": (1.0, 0.75, 0.8), "cyan": (0.0, 1.0, 1.0),
    "brown": (0.55, 0.27, 0.07), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
}
_COLOR_WORD = re.compile(r"\b(" + "|".join(COLORS) + r")\b", re.IGNORECASE)


def prompt_color(prompt: str) -> Optional[str]:
    """The first colour word of the prompt (a key of ``COLORS``), or None."""
    match = _COLOR_WORD.search(prompt)
    return match.group(1).lower() if match else None


class ColorMatch(_PixelReward):
    """1 - mean over pixels of |pixel - prototype| / sqrt(3), for the first colour named in the prompt.

    In [0,1]; 1 when every pixel is the named colour. Prompts without a colour word (see ``COLORS``) score 0,
    a constant, so they add no gradient.
    """

    def _score_pixels(self, pixels, prompts):
        out = []
        for image, prompt in zip(pixels, prompts):
            color = prompt_color(prompt)
            if color is None:
                out.append(image.sum() * 0)  # keeps the graph connected, gradient 0
                continue
            target = torch.tensor(COLORS[color], device=image.device, dtype=image.dtype).view(3, 1, 1)
            # eps inside the sqrt: the gradient of a norm at exactly 0 distance is NaN.
            dist = ((image - target) ** 2).sum(0).add(1e-12).sqrt() / math.sqrt(3)
            out.append(1 - dist.mean())
        return torch.stack(out)


# --------------------------------------------------------------------------- rewards without a gradient
def to_uint8(images: torch.Tensor):
    """(..., 3, H, W) in [0,1] (images, or videos (B, F, 3, H, W)) -> a uint8 numpy array (..., H, W, 3), rounded as
    diffusers' pipelines and DDPO do ((x * 255).round())."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def tensor_to_pil(images: torch.Tensor) -> list:
    """(B,3,H,W) in [0,1] -> RGB PIL images (`to_uint8`), for scorers that read PIL images (``score``)."""
    from PIL import Image

    return [Image.fromarray(a) for a in to_uint8(images)]  # (H, W, 3) each


def no_gradient_error(names: Sequence[str], spec: Optional[str] = None) -> UsageError:
    """One line: the rewards `names` (parts of `spec`, where given) have no gradient, and what would be right."""
    which = f"reward {names[0]!r} has" if len(names) == 1 else f"rewards {', '.join(map(repr, names))} have"
    where = f" (in {spec!r})" if spec else ""
    differentiable = [name for name, entry in _registry().items() if entry.differentiable]
    return UsageError(
        f"{which} no gradient{where}, only score(pil_images, prompts), one number per image without a graph; reward "
        f"back-propagation (DRaFT, train_draftp.py) needs a differentiable reward ({', '.join(differentiable)}), "
        f"online RL (train_online.py) takes any")


class ScoreOnlyReward(Reward):
    """A scorer without a gradient: one number per PIL image (a file size, a pixel judge, a reward server).

    Subclasses give ``_score_pil(pil_images, prompts) -> list of float``. ``__call__`` and ``parts`` (the
    differentiable path) raise a UsageError naming the reward: there is no graph to back-propagate through."""

    differentiable = False

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise no_gradient_error([self.name])

    @torch.no_grad()
    def score(self, pil_images: Sequence, prompts: Sequence[str]) -> List[float]:
        _check_batch(len(pil_images), prompts)
        return [float(s) for s in self._score_pil(list(pil_images), list(prompts))]

    def _score_pil(self, pil_images: list, prompts: List[str]) -> List[float]:
        raise NotImplementedError


# DDPO's setting (Black et al. 2023; ddpo-pytorch, ddpo_pytorch/rewards.py: image.save(buffer, format="JPEG",
# quality=95), size = buffer.tell() / 1000).
JPEG_QUALITY = 95


def jpeg_size_kb(image) -> float:
    """Size in kB (bytes / 1000) of the RGB PIL image saved as JPEG at quality 95, PIL's other settings at default."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.tell() / 1000


class JpegSize(ScoreOnlyReward):
    """``sign`` * JPEG size in kB: +1 is DDPO's jpeg_incompressibility, -1 its jpeg_compressibility."""

    def __init__(self, name: str, sign: float):
        super().__init__(name)
        self.sign = sign

    def _score_pil(self, pil_images, prompts):
        return [self.sign * jpeg_size_kb(image) for image in pil_images]


class JudgeReward(ScoreOnlyReward):
    """A pixel judge (``Judge``: judge(uint8 (H, W, 3) array, prompt) -> float) as a reward, e.g. the toy world's.
    Prompts the judge cannot read raise its check_prompts' UsageError instead of scoring 0."""

    def __init__(self, name: str, judge: "Judge"):
        super().__init__(name)
        self.judge = judge

    def _score_pil(self, pil_images, prompts):
        import numpy as np

        self.judge.check_prompts(prompts)
        return [self.judge.judge(np.asarray(image.convert("RGB")), prompt) for image, prompt in zip(pil_images, prompts)]


REWARD_TIMEOUT_ENV = "DIFFUSION_ALIGN_REWARD_TIMEOUT"
REWARD_RETRIES_ENV = "DIFFUSION_ALIGN_REWARD_RETRIES"
REWARD_TIMEOUT = 120.0  # seconds for the connection and for each read of the answer (DDPO's LLaVA client waits 120)
REWARD_RETRIES = 3  # requests sent again after a failure, so 4 attempts in all
REWARD_BACKOFF = 1.0  # seconds before the first retry, doubled before each next one
REWARD_BACKOFF_MAX = 30.0
PROTOCOL = ('POST JSON {"prompts": [...], "images": [base64 PNG, ...]} answered by {"scores": [one finite float per '
            'image]} (utils/rewards.py)')


class RewardServerError(UsageError):
    """A reward server gave no usable answer after the retries: down, too slow, or an answer of the wrong shape."""


class _Failed(Exception):
    """One failed request: why (one line), and whether sending it again may help."""

    def __init__(self, why: str, retry: bool = True):
        super().__init__(why)
        self.retry = retry


def _one_line(text, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def encode_png(image) -> str:
    """PIL image -> base64 of its RGB PNG: how images travel to a reward server."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=1)  # lossless at any level; 1 is the fastest
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str):
    """base64 PNG (or any image format PIL reads) -> RGB PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text, validate=True))).convert("RGB")


def _finite(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def parse_scores(body: bytes, n: int) -> List[float]:
    """A server's answer to a request of `n` images -> its n scores; raises _Failed saying what is wrong with it."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise _Failed(f"the answer is not JSON: {_one_line(body[:200].decode('utf-8', 'replace'))!r}") from None
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list):
        raise _Failed(f"the answer has no list 'scores': {_one_line(json.dumps(answer))!r}")
    if len(scores) != n:
        raise _Failed(f"the answer holds {len(scores)} scores for {n} images")
    bad = [s for s in scores if not _finite(s)]
    if bad:
        raise _Failed(f"{len(bad)} of the {n} scores are not finite numbers, e.g. {_one_line(json.dumps(bad[0]))}")
    return [float(s) for s in scores]


class HttpReward(ScoreOnlyReward):
    """Scores from a reward server over HTTP (the protocol in this module's docstring); no gradient."""

    batch_size = 16  # images a request

    def __init__(self, name: str, url: str, timeout: float = REWARD_TIMEOUT, retries: int = REWARD_RETRIES,
                 backoff: float = REWARD_BACKOFF):
        super().__init__(name)
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), int(retries), float(backoff)

    def _score_pil(self, pil_images, prompts):
        scores = []
        for i in range(0, len(pil_images), self.batch_size):
            images = [encode_png(image) for image in pil_images[i : i + self.batch_size]]
            scores += self.request(images, prompts[i : i + self.batch_size])
        return scores

    def request(self, images: List[str], prompts: List[str]) -> List[float]:
        """POST one batch (base64 PNGs and their prompts) and return its scores; RewardServerError after the retries."""
        body = json.dumps({"prompts": list(prompts), "images": list(images)}).encode()
        attempt = 0
        while True:
            attempt += 1
            try:
                return parse_scores(self._post(body), len(images))
            except _Failed as failure:
                if not failure.retry or attempt > self.retries:
                    tries = f"{attempt} attempt{'s' if attempt > 1 else ''}" + ("" if failure.retry else ", not retried")
                    raise RewardServerError(
                        f"reward server {self.url}: {failure} ({tries}, {self.timeout:g} s timeout each); expected "
                        f"{PROTOCOL}; check that the server runs at that URL, or raise {REWARD_TIMEOUT_ENV} / "
                        f"{REWARD_RETRIES_ENV}") from None
            time.sleep(min(self.backoff * 2 ** (attempt - 1), REWARD_BACKOFF_MAX))

    def _post(self, body: bytes) -> bytes:
        import http.client
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as err:
            # 5xx: the server failed (it may recover); 408 / 429: it asks to be asked again; other 4xx: the request
            # itself is wrong, and sending it again would not help
            raise _Failed(f"HTTP {err.code} {err.reason}{_error_detail(err)}",
                          retry=err.code >= 500 or err.code in (408, 429)) from None
        except urllib.error.URLError as err:  # the connection: refused, no such host, or a timeout while connecting
            if isinstance(err.reason, TimeoutError):
                raise _Failed(f"no answer within {self.timeout:g} s") from None
            raise _Failed(f"no connection ({_one_line(err.reason)})") from None
        except TimeoutError:  # connected, but the answer did not come in time
            raise _Failed(f"no answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as err:  # the connection broke during the answer
            raise _Failed(f"the connection broke ({_one_line(err) or type(err).__name__})") from None


def _error_detail(err) -> str:
    """': <message>' from an error answer's body ({"error": "..."} or plain text), or ''."""
    try:
        text = err.read(2000).decode("utf-8", "replace")
    except Exception:  # the body could not be read: the status line says enough
        return ""
    try:
        text = json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        pass
    return f": {_one_line(text)}" if text.strip() else ""


def _env_number(name: str, default, kind, minimum, what: str):
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value >= minimum or (kind is float and not math.isfinite(value)):
        raise UsageError(f"{name}={text!r}: expected {what}")
    return value


def build_http_reward(name: str, url: Optional[str]) -> HttpReward:
    """The reward server at `url` (``--reward_model_paths NAME=URL``), asked once with an empty request so that a wrong
    URL or a server that is down fails here, before any image is drawn. A plugin registers more servers under names of
    their own: ``register_reward("geneval", build_http_reward, differentiable=False)``."""
    from urllib.parse import urlsplit

    hint = f"give the server's URL with --reward_model_paths {name}=http://HOST:PORT/"
    if url is None:
        raise UsageError(f"reward {name!r} is a reward server and needs its URL; {hint}")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise UsageError(f"reward {name!r}: {url!r} is not an http:// or https:// URL; {hint}")
    timeout = _env_number(REWARD_TIMEOUT_ENV, REWARD_TIMEOUT, float, 1e-3, "seconds a request may wait, > 0")
    retries = _env_number(REWARD_RETRIES_ENV, REWARD_RETRIES, int, 0, "the number of retries, an integer >= 0")
    scorer = HttpReward(name, url, timeout=timeout, retries=retries)
    scorer.request([], [])
    return scorer


# --------------------------------------------------------------------------- CLIP-based scorers (transformers)
class _HFClipReward(Reward):
    """A transformers ``CLIPModel`` + ``CLIPProcessor``; subclasses turn embeddings into a score."""

    def __init__(self, name, model, processor):
        super().__init__(name)
        self.model = model
        self.processor = processor
        self.prep = ImagePrep.from_clip_processor(processor.image_processor)

    def _param(self) -> torch.Tensor:
        """A weight of the towers: their device and dtype (the training dtype; see ``float32_parts``)."""
        return self.model.vision_model.embeddings.patch_embedding.weight

    def float32_parts(self):
        return [self.model.logit_scale]

    def pixels_from_tensor(self, images):
        return prepare_pixels(images, self.prep)

    def pixels_from_pil(self, pil_images):
        return self.processor(images=pil_images, return_tensors="pt")["pixel_values"]

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings (B, D)."""
        p = self._param()
        # vision_model + visual_projection directly: get_image_features returns a tensor in transformers 4 and an
        # output object in 5.
        pooled = self.model.vision_model(pixel_values=pixels.to(p.device, p.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, prompts: List[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings (B, D); prompts longer than 77 tokens are truncated."""
        tok = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        device = self._param().device
        out = self.model.text_model(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)


class PickScore(_HFClipReward):
    def _score_pixels(self, pixels, prompts):
        cos = (self.image_embeds(pixels) * self.text_embeds(prompts)).sum(-1)
        return self.model.logit_scale.exp().float() * cos


class ClipScore(_HFClipReward):
    def _score_pixels(self, pixels, prompts):
        return 100.0 * (self.image_embeds(pixels) * self.text_embeds(prompts)).sum(-1)


AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"


class AestheticMLP(torch.nn.Module):
    """The aesthetic head: Linear layers at indices 0, 2, 4, 6, 7 (dropouts in between, no activations)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        nn = torch.nn
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic(_HFClipReward):
    def __init__(self, name, model, processor, mlp):
        super().__init__(name, model, processor)
        self.mlp = mlp

    def float32_parts(self):
        return [*super().float32_parts(), self.mlp]  # the head maps a unit vector to a score of ~5: no bf16 there

    def _score_pixels(self, pixels, prompts):
        return self.mlp(self.image_embeds(pixels))[:, 0]


# --------------------------------------------------------------------------- HPS v2 (open_clip)
class OpenClipReward(Reward):
    """An open_clip CLIP; score = cosine of the normalised image and text features (HPSv2's score)."""

    def __init__(self, name, model, preprocess, tokenizer):
        super().__init__(name)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.prep = ImagePrep.from_open_clip(model.visual.preprocess_cfg)

    def pixels_from_tensor(self, images):
        return prepare_pixels(images, self.prep)

    def pixels_from_pil(self, pil_images):
        return torch.stack([self.preprocess(im) for im in pil_images])

    def float32_parts(self):
        return [self.model.logit_scale]

    def _score_pixels(self, pixels, prompts):
        p = next(self.model.visual.parameters())
        # the towers in their dtype, the cosine (normalisation + dot product) in float32
        image = F.normalize(self.model.encode_image(pixels.to(p.device, p.dtype)).float(), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(p.device)).float(), dim=-1)
        return (image * text).sum(-1)


# --------------------------------------------------------------------------- loading
def _looks_local(path: str) -> bool:
    return os.path.exists(path) or path.startswith((".", "/", "~")) or os.path.isabs(path) or path.endswith((".pt", ".pth"))


def _missing_local(name: str, path: str, expected: str) -> UsageError:
    return UsageError(f"{name}: local path {path!r} does not exist (expected {expected}); give it with {_path_flag(name)}")


def _hub_error(name: str, what: str, source: str, err: Exception) -> UsageError:
    """Loading ``what`` from ``source`` (a hub id or a local folder) failed: say where we looked and what to do."""
    if os.path.isdir(source):
        where = f"local folder {source!r}"
    elif hub_offline():
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    else:
        where = "the Hugging Face cache and hub"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not os.path.isdir(source) and not hub_offline() and hub_unreachable() is not None:
        from huggingface_hub import constants

        where = "the local Hugging Face cache"
        first_line = f"the hub at {constants.ENDPOINT} is unreachable: {hub_unreachable()}"
    return UsageError(
        f"{name}: could not load {what} from {where} ({first_line}); download it once with network access "
        f"or point at a local copy with {_path_flag(name)}"
    )


_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def load_clip(name: str, model_id: str, processor_id: str):
    """A CLIPModel and its CLIPProcessor from a hub id or a save_pretrained folder."""
    from transformers import CLIPModel, CLIPProcessor

    if _looks_local(model_id) and not os.path.isdir(model_id):
        raise _missing_local(name, model_id, "a folder with a CLIPModel and processor files from save_pretrained")
    # transformers 5 writes processor_config.json, 4.x preprocessor_config.json.
    if os.path.isdir(model_id) and any(os.path.isfile(os.path.join(model_id, f)) for f in _PROCESSOR_FILES):
        processor_id = model_id
    try:
        model = CLIPModel.from_pretrained(model_id, local_files_only=not os.path.isdir(model_id) and _local_files_only())
    except OSError as err:
        raise _hub_error(name, f"CLIPModel {model_id!r} (config.json + model.safetensors)", model_id, err) from err
    try:
        local = not os.path.isdir(processor_id) and _local_files_only()
        processor = CLIPProcessor.from_pretrained(processor_id, local_files_only=local)
    except OSError as err:
        raise _hub_error(name, f"CLIPProcessor {processor_id!r} (processor config + tokenizer files)", processor_id, err) from err
    return model, processor


def _finish(scorer: Reward, device, dtype) -> Reward:
    return scorer.to(device=device, dtype=dtype).freeze()


def _aesthetic_mlp_file(name: str, path: Optional[str]) -> str:
    if path is not None:
        candidate = os.path.join(path, AESTHETIC_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(candidate):
            raise _missing_local(name, candidate, f"{AESTHETIC_FILE}, or a folder holding it")
        return candidate
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", AESTHETIC_FILE)
    if os.path.isfile(cached):
        return cached
    hint = f"put {AESTHETIC_FILE} there or pass a folder / .pth with {_path_flag(name)}"
    if hub_offline():
        raise UsageError(f"{name}: {cached} not found and HF_HUB_OFFLINE is set; {hint}")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        torch.hub.download_url_to_file(AESTHETIC_URL, cached)
    except OSError as err:
        raise UsageError(f"{name}: could not download {AESTHETIC_URL} to {cached} ({err}); {hint}") from err
    return cached


HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
# Diffusion-DPO's CLIP judge (its utils/clip_utils.py: open_clip ViT-H-14, pretrained 'laion2B-s32B-b79K'): the weights
# as open_clip's pretrained table fetches them, from this hub repo.
LAION_H14_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
LAION_H14_FILE = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# The keys of an open_clip model config that may replace ViT-H-14's (see open_clip.create_model's model_kwargs).
_ARCH_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias")


def _checkpoint_file(name: str, path: Optional[str], repo: str, filename: str) -> str:
    """The checkpoint `filename` of hub repo `repo`, or the local file `path` (or `path`/`filename` for a folder)."""
    if path is not None:
        candidate = os.path.join(path, filename) if os.path.isdir(path) else path
        if not os.path.isfile(candidate):
            raise _missing_local(name, candidate, f"the checkpoint file, or a folder holding {filename}")
        return candidate
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=_local_files_only())
    except Exception as err:  # the hub raises several unrelated types (offline, HTTP, not found); all mean "missing"
        raise _hub_error(name, f"{filename} of hub repo {repo!r}", repo, err) from err


def _sidecar_arch(checkpoint: str) -> Optional[dict]:
    import json

    sidecar = os.path.join(os.path.dirname(checkpoint), OPEN_CLIP_CONFIG)
    if not os.path.isfile(sidecar):
        return None
    with open(sidecar) as f:
        config = json.load(f)
    return config.get("model_cfg", config)


def load_hps(name: str, path: Optional[str] = None, arch: str = "ViT-H-14", arch_config: Optional[dict] = None) -> OpenClipReward:
    """HPS v2 / v2.1 through open-clip-torch. ``arch_config`` (or an ``open_clip_config.json`` next to the
    checkpoint) replaces the architecture of ``arch``, e.g. a tiny model for tests."""
    return load_open_clip(name, _checkpoint_file(name, path, HPS_REPO, HPS_FILES[name]), arch, arch_config)


def load_open_clip(name: str, checkpoint: str, arch: str = "ViT-H-14", arch_config: Optional[dict] = None) -> OpenClipReward:
    """An open_clip CLIP from a checkpoint file, preprocessed as HPSv2 and Diffusion-DPO's judges preprocess (resize
    the longest side, pad with black) and scored as the cosine of the normalised features. ``arch_config`` (or an
    ``open_clip_config.json`` next to the checkpoint) replaces the architecture of ``arch``."""
    import open_clip

    arch_config = arch_config or _sidecar_arch(checkpoint) or {}
    overrides = {k: v for k, v in arch_config.items() if k in _ARCH_KEYS}
    # 'longest': HPSv2 scores with light_augmentation=True, i.e. resize the longest side and pad with black.
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint, image_resize_mode="longest", **overrides)
    context_length = overrides.get("text_cfg", {}).get("context_length", 77)
    tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
    return OpenClipReward(name, model, preprocess, tokenizer)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Entry:
    build: Callable[[str, Optional[str]], Reward]  # (name, local path or None) -> scorer on CPU, float32
    learned: bool  # takes a path (--reward_model_paths NAME=PATH): its weights, or a reward server's URL
    differentiable: bool = True  # what the built scorer's .differentiable says, known before it is built


def _build_pickscore(name, path):
    return PickScore(name, *load_clip(name, path or "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"))


def _build_clip(name, path):
    return ClipScore(name, *load_clip(name, path or "openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"))


def _build_clip_h14(name, path):
    return load_open_clip(name, _checkpoint_file(name, path, LAION_H14_REPO, LAION_H14_FILE))


def _build_aesthetic(name, path):
    clip_id = "openai/clip-vit-large-patch14"
    if path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        clip_id = path
    mlp_file = _aesthetic_mlp_file(name, path)
    model, processor = load_clip(name, clip_id, clip_id)
    mlp = AestheticMLP(model.config.projection_dim)
    mlp.load_state_dict(torch.load(mlp_file, map_location="cpu", weights_only=True))
    return Aesthetic(name, model, processor, mlp)


_REGISTRY: Dict[str, _Entry] = {
    "pickscore": _Entry(_build_pickscore, True),
    "clip": _Entry(_build_clip, True),
    "clip_h14": _Entry(_build_clip_h14, True),
    "aesthetic": _Entry(_build_aesthetic, True),
    "hpsv2": _Entry(lambda name, path: load_hps(name, path), True),
    "hpsv2.1": _Entry(lambda name, path: load_hps(name, path), True),
    "brightness": _Entry(lambda name, path: Brightness(name), False),
    "saturation": _Entry(lambda name, path: Saturation(name), False),
    "color_match": _Entry(lambda name, path: ColorMatch(name), False),
    "jpeg_incompressibility": _Entry(lambda name, path: JpegSize(name, +1.0), False, differentiable=False),
    "jpeg_compressibility": _Entry(lambda name, path: JpegSize(name, -1.0), False, differentiable=False),
    "http": _Entry(build_http_reward, True, differentiable=False),
}


def register_reward(name: str, build: Callable[[str, Optional[str]], Reward], learned: bool = True,
                    differentiable: bool = True):
    """Make `name` a scoring model of --reward_model / --choice_model / evaluate.py (plugins, utils/plugins.py).
    build(name, local path or None) returns the scorer on the CPU in float32; `learned`: it takes a path
    (--reward_model_paths NAME=PATH), e.g. the local copy of its weights; `differentiable`: False for a scorer without
    a gradient (a ``ScoreOnlyReward``), so that train_draftp.py refuses it before anything loads."""
    _REGISTRY[name] = _Entry(build, learned, differentiable)


@dataclass
class Judge:
    """A check of an image against its prompt read from the pixels (no model, no gradient), e.g. the toy world's
    count / colour / shape judge: judge(uint8 (H, W, 3) image, prompt) -> score; check_prompts(prompts) raises a
    UsageError for prompts it cannot judge (before any image is drawn)."""

    judge: Callable[[Any, str], float]
    check_prompts: Callable[[List[str]], None]


_JUDGES: Dict[str, Judge] = {}


def register_judge(name: str, judge: Callable[[Any, str], float], check_prompts: Callable[[List[str]], None]):
    """Make `name` a judge of evaluate.py's --judges (plugins, utils/plugins.py)."""
    _JUDGES[name] = Judge(judge, check_prompts)


def load_judge(name: str) -> Judge:
    load_plugins()
    if name not in _JUDGES:
        raise UsageError(f"unknown judge {name!r}; registered judges: {', '.join(_JUDGES) or 'none'}")
    return _JUDGES[name]


def list_judges() -> List[str]:
    load_plugins()
    return list(_JUDGES)


def _registry() -> Dict[str, _Entry]:
    load_plugins()
    return _REGISTRY


def list_rewards() -> List[str]:
    """Every valid reward name (argparse ``choices`` and validation)."""
    return list(_registry())


def reward_is_differentiable(spec: str) -> bool:
    """Whether every reward of `spec` (a name or a weighted sum) has a gradient, from the registry: nothing loads."""
    return all(_registry()[name].differentiable for name, _ in parse_reward_spec(spec))


def require_differentiable(spec: str, flag: str) -> None:
    """One-line UsageError naming `flag` where a reward of `spec` has no gradient (checked before anything loads)."""
    missing = [name for name, _ in parse_reward_spec(spec) if not _registry()[name].differentiable]
    if missing:
        raise UsageError(f"{flag}: {no_gradient_error(missing, spec if ',' in spec or ':' in spec else None)}")


def parse_reward_spec(spec: str) -> List[Tuple[str, float]]:
    """"pickscore:1.0,aesthetic:0.05" -> [("pickscore", 1.0), ("aesthetic", 0.05)]; a bare name weighs 1."""
    valid = ", ".join(list_rewards())
    items = [item.strip() for item in str(spec).split(",")]
    if not any(items):
        raise UsageError(f"empty reward spec {spec!r}; valid names: {valid}")
    parsed = []
    for item in items:
        name, sep, weight_text = item.partition(":")
        name = name.strip()
        if name not in _registry():
            raise UsageError(f"unknown reward {name!r} in {spec!r}; valid names: {valid}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise UsageError(f"bad weight {weight_text.strip()!r} for reward {name!r} in {spec!r}; expected NAME:FLOAT, e.g. pickscore:1.0,aesthetic:0.05")
        if name in dict(parsed):
            raise UsageError(f"reward {name!r} appears twice in {spec!r}")
        parsed.append((name, weight))
    return parsed


def load_reward(
    spec: str,
    model_name_or_path: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    paths: Optional[Dict[str, str]] = None,
) -> Reward:
    """Build the scorer for ``spec`` (a name or a weighted sum), frozen, on ``device`` in ``dtype``.

    ``model_name_or_path`` replaces the hub id of a single-name spec; ``paths`` maps names to local
    folders/files for any spec. A bare single name returns that scorer; anything else a ``WeightedSum``.
    """
    parsed = parse_reward_spec(spec)
    paths = dict(paths or {})
    for name in paths:
        if name not in _REGISTRY:
            raise UsageError(f"unknown reward {name!r} in the model paths; valid names: {', '.join(list_rewards())}")
    if model_name_or_path is not None:
        if len(parsed) != 1:
            raise UsageError(f"model_name_or_path needs a single reward, not {spec!r}; use {PATH_FLAG} per name")
        paths[parsed[0][0]] = model_name_or_path
    scorers = []
    for name, _ in parsed:
        path = paths.get(name)
        if path is not None and not _REGISTRY[name].learned:
            raise UsageError(f"reward {name!r} has no weights, so it takes no path (got {path!r})")
        path = os.path.expanduser(path) if path is not None else None
        scorer = _REGISTRY[name].build(name, path)
        if scorer.differentiable != _REGISTRY[name].differentiable:  # train_draftp.py's check trusts the registry
            raise UsageError(f"reward {name!r} is registered with differentiable={_REGISTRY[name].differentiable} but "
                             f"builds a scorer with differentiable={scorer.differentiable}; register it with "
                             f"register_reward({name!r}, ..., differentiable={scorer.differentiable})")
        scorers.append(_finish(scorer, device, dtype))
    if len(parsed) == 1 and parsed[0][1] == 1.0 and "," not in spec and ":" not in spec:
        return scorers[0]
    return WeightedSum(scorers, [w for _, w in parsed]).freeze()
