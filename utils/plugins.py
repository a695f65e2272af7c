"""Plugins: modules that register pipelines, scoring models and prompt sets under names of their own.

A plugin is any importable module that calls `utils.models.register_pipeline`, `utils.rewards.register_reward` or
`utils.data.register_prompt_set` when imported. The registries import the modules named in DIFFUSION_ALIGN_PLUGINS
(comma-separated; default `utils.toy`, the offline toy world and tiny pipelines; empty for none) the first time a
name is looked up, so `--reward_model my_reward` works once `DIFFUSION_ALIGN_PLUGINS=my_package.rewards,utils.toy`
is set, in every script and in every process that accelerate starts.
"""
import importlib
import os

from . import UsageError

PLUGINS_ENV = "DIFFUSION_ALIGN_PLUGINS"
DEFAULT_PLUGINS = "utils.toy"
_loaded = False


def load_plugins():
    """Import the plugin modules once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a plugin's own registry calls come back here
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, DEFAULT_PLUGINS).split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UsageError(f"{PLUGINS_ENV}: cannot import the plugin module {name!r} ({e}); set it to importable "
                             f"module names, comma-separated (default: {DEFAULT_PLUGINS})") from None
