"""Hub ids as users write them: every model id the launchers, evaluate.py, the scripts' docstrings and the notebook
use is taken for a hub id (dots included: `stabilityai/stable-diffusion-3.5-medium`, `black-forest-labs/FLUX.1-dev`),
and such an id loads through the hub's own download path from a prefilled local hub cache with HF_HUB_OFFLINE set."""
import json
import os
import re
import shutil
import sys

import pytest

from utils import UsageError
from utils.data import _looks_local
from utils.models import is_hub_id, read_model_index
from utils.toy import TINY_NAMES, TOY_NAMES

from conftest import REPO_ROOT, run_command

FLAG = "--pretrained_model_name_or_path"


def model_ids_users_pass():
    """The model ids written in the launchers (MODEL=${MODEL:-id}), the scripts' and evaluate.py's usage lines
    and the notebook's default base."""
    ids = set()
    for launcher in (REPO_ROOT / "launchers").glob("*.sh"):
        ids.update(re.findall(r"MODEL=\$\{MODEL:-([^}]+)\}", launcher.read_text()))
    for script in ("train_draftp.py", "train_dpo.py", "evaluate.py"):
        ids.update(re.findall(rf"{FLAG}\s+(\S+)", (REPO_ROOT / script).read_text()))
    cells = json.loads((REPO_ROOT / "notebooks" / "quick_samples.ipynb").read_text())["cells"]
    source = "".join("".join(c["source"]) for c in cells)
    ids.update(re.findall(r'"QS_BASE", "([^"]+)"', source))
    return sorted(i.strip("\"'") for i in ids if i.strip("\"'") not in (*TINY_NAMES, *TOY_NAMES) and "$" not in i)


REAL_IDS = model_ids_users_pass()


def test_the_ids_users_pass_include_the_dotted_recipes():
    """The list the next tests run over is read from the files, so it must hold the ids that once failed."""
    assert "stabilityai/stable-diffusion-3.5-medium" in REAL_IDS
    assert "black-forest-labs/FLUX.1-dev" in REAL_IDS
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in REAL_IDS


@pytest.mark.parametrize("model_id", REAL_IDS)
def test_every_model_id_of_the_launchers_and_docs_is_a_hub_id(model_id):
    """Mutation: treating a name with an extension ('.5-medium', '.1-dev') as a local path fails here."""
    assert is_hub_id(model_id)
    with pytest.raises(UsageError) as err:  # HF_HUB_OFFLINE and an empty cache: the hub is asked, not refused
        read_model_index(model_id + "-not-cached")
    message = str(err.value)
    assert "\n" not in message and FLAG in message and "from the hub" in message and "does not exist" not in message


@pytest.mark.parametrize("name", ["./sd15", "/models/sd15", "~/sd15", "sd15", "a/b/c", "owner/name..x", "owner/-name"])
def test_paths_and_malformed_names_are_not_hub_ids(name):
    assert not is_hub_id(name)


@pytest.mark.parametrize("source, local", [("yuvalkirstain/pickapic_v2", False), ("owner/prefs.v2", False),
                                            ("pairs.parquet", True), ("data/prompts.jsonl", True), ("./pairs", True)])
def test_dataset_sources_with_dots_are_not_taken_for_files(source, local):
    assert _looks_local(source) == local


def prefill_hub_cache(cache, repo_id: str, folder: str):
    """What `huggingface-cli download` leaves in a hub cache: the snapshot under a commit hash and refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_dotted_hub_ids_load_from_a_prefilled_hub_cache_offline(tmp_path):
    """The SD3.5 and FLUX recipes' ids go through hf_hub_download and from_pretrained exactly as online, served from
    the cache (the tiny pipelines of the same families stand in for the real weights)."""
    from utils.toy.tiny import tiny_pipeline_path

    cache = tmp_path / "hub"
    prefill_hub_cache(cache, "stabilityai/stable-diffusion-3.5-medium", tiny_pipeline_path("tiny-sd3"))
    prefill_hub_cache(cache, "black-forest-labs/FLUX.1-dev", tiny_pipeline_path("tiny-flux"))
    code = ("from utils.models import load_pipeline_parts\n"
            "for repo in ('stabilityai/stable-diffusion-3.5-medium', 'black-forest-labs/FLUX.1-dev'):\n"
            "    parts = load_pipeline_parts(repo)\n"
            "    print(repo, parts.family, type(parts.unet).__name__)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = run_command([sys.executable, "-c", code], 300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert "stabilityai/stable-diffusion-3.5-medium sd3 SD3Transformer2DModel" in lines
    assert "black-forest-labs/FLUX.1-dev flux FluxTransformer2DModel" in lines
