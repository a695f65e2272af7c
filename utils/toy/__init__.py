"""The toy world and the tiny models: test and demo infrastructure, kept apart from the product in utils/.

- tiny.py          tiny random SD1.5 / SDXL / SD3 / FLUX pipelines built in code (`tiny-sd`, `tiny-sdxl`, `tiny-sd3`,
                   `tiny-flux`), for the tests
- tiny_rewards.py  tiny scoring-model checkpoints in the real file formats, for the loaders' tests
- world.py         the procedural captioned toy world and its pixel judge
- models.py        the toy world's own models (`toy-sd`, `toy-sd3`, `toyclip`, committed in assets/) and their
                   trainers
- synthetic.py     synthetic preference sets

This file holds only names and paths, so that the product code (utils.models, utils.rewards) can resolve
`tiny-sd`, `toy-sd`, `toy-sd3` and `toyclip` without importing the toy modules, which import the product code in turn.
"""
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TOY_SD_PATH = ASSETS / "toy-sd"
TOYCLIP_PATH = ASSETS / "toyclip"
TOY_SD3_PATH = ASSETS / "toy-sd3"
TOY_NAMES = {"toy-sd": TOY_SD_PATH, "toy-sd3": TOY_SD3_PATH}
TINY_NAMES = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")
