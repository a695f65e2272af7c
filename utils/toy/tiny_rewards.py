"""Tiny random-weight scoring models, written in each model's real on-disk format (for tests and offline demos).

Each builder writes what the real model ships, so the registry loads it through the same code as the real one:

- ``save_tiny_clip(folder)``: a transformers ``CLIPModel`` + ``CLIPProcessor`` via ``save_pretrained``
  (what ``pickscore`` and ``clip`` take as a local folder);
- ``save_tiny_aesthetic(folder)``: the same CLIP (projection 768, as ViT-L/14) plus
  ``sac+logos+ava1-l14-linearMSE.pth``, a plain state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}``;
- ``save_tiny_open_clip_checkpoint(path)``: an open_clip CLIP saved as the HPS checkpoints are, a dict
  ``{"state_dict": model.state_dict()}``, plus ``open_clip_config.json`` next to it naming the tiny architecture;
- ``save_tiny_open_clip_hub(folder)``: the same tiny open_clip CLIP as the open_clip hub repos ship it (what
  ``clip_h14`` takes as a local folder): the bare state dict as ``open_clip_pytorch_model.bin`` plus
  ``open_clip_config.json``.

Images are 32x32 for the vision towers (patch 8); the tokenizer is the real CLIP BPE (``utils.toy.tiny``).
"""
import json
import os
from pathlib import Path

import torch

TINY_IMAGE_SIZE = 32

# open_clip model config of the tiny HPS stand-in: same layout as ViT-H-14.json, small sizes.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def _tiny_clip_model(projection_dim: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE, patch_size=8,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))


def save_tiny_clip(folder, projection_dim: int = 16, seed: int = 0) -> str:
    """Write a tiny CLIPModel and its CLIPProcessor (shortest edge 32, crop 32) to ``folder``; return it."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from utils.toy.tiny import build_clip_tokenizer

    torch.manual_seed(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    _tiny_clip_model(projection_dim).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return str(folder)


def aesthetic_state_dict(input_size: int = 768, seed: int = 0) -> dict:
    """Random weights with the exact keys and shapes of sac+logos+ava1-l14-linearMSE.pth.

    Written out by hand (not from utils.rewards.AestheticMLP), so that a wrong layout in the loader fails the
    strict load instead of agreeing with itself.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = {0: (input_size, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}
    state = {}
    for index, (fan_in, fan_out) in sizes.items():
        bound = fan_in ** -0.5
        state[f"layers.{index}.weight"] = (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound
        state[f"layers.{index}.bias"] = (torch.rand(fan_out, generator=g) * 2 - 1) * bound
    return state


def save_tiny_aesthetic(folder, seed: int = 0) -> str:
    """A folder as the ``aesthetic`` scorer takes it: tiny CLIP (projection 768) + the MLP .pth. Returns it."""
    from utils.rewards import AESTHETIC_FILE

    save_tiny_clip(folder, projection_dim=768, seed=seed)
    torch.save(aesthetic_state_dict(768, seed), os.path.join(folder, AESTHETIC_FILE))
    return str(folder)


def save_tiny_open_clip_checkpoint(path, seed: int = 0, wrap: bool = True) -> str:
    """Write a tiny open_clip CLIP as ``{"state_dict": ...}`` at ``path`` (e.g. .../HPS_v2_compressed.pt) and
    its architecture as ``open_clip_config.json`` in the same folder. Returns ``path``. ``wrap=False`` saves the bare
    state dict, as the open_clip hub repos do."""
    import open_clip

    from utils.rewards import OPEN_CLIP_CONFIG

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ViT-H-14's config replaced wholesale by the tiny one (create_model's keyword overrides).
    model = open_clip.create_model("ViT-H-14", pretrained=None, **TINY_OPEN_CLIP_CONFIG)
    # Random init leaves logit_scale at log(1/0.07); perturb every tensor a little so a load that silently
    # kept the init would be caught.
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state} if wrap else state, path)
    (path.parent / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG}, indent=2))
    return str(path)


def save_tiny_open_clip_hub(folder, seed: int = 0) -> str:
    """A folder laid out as an open_clip hub repo (laion/CLIP-ViT-H-14-laion2B-s32B-b79K): the tiny open_clip CLIP's
    bare state dict as ``open_clip_pytorch_model.bin`` and ``open_clip_config.json``. Returns the folder."""
    from utils.rewards import LAION_H14_FILE

    save_tiny_open_clip_checkpoint(Path(folder) / LAION_H14_FILE, seed=seed, wrap=False)
    return str(folder)
