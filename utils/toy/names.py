"""The toy plugin's names and the folders of its committed models."""
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TOY_SD_PATH = ASSETS / "toy-sd"
TOYCLIP_PATH = ASSETS / "toyclip"
TOY_SD3_PATH = ASSETS / "toy-sd3"
TOY_NAMES = {"toy-sd": TOY_SD_PATH, "toy-sd3": TOY_SD3_PATH}
TINY_NAMES = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-sd2", "tiny-wan")
