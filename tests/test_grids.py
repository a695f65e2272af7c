"""utils/grids.py: labelled image grids (size, where the labels are drawn, the images back out exactly), and
utils.train.validation.log_validation, which writes them for both training scripts."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from utils.grids import (BACKGROUND, GAP, MAX_COLUMN_LINES, fit, font, grid_geometry, labelled_grid, line_height,
                         read_cells)
from utils.train.validation import log_validation

ROWS = ["base", "trained"]
PROMPTS = ["two red circles", "three blue squares", "one green triangle"]
LONG = "three blue squares on a black background in the left half of the picture, drawn very carefully by hand"


def random_images(n, size=64, seed=0):
    """(n, 3, size, size) in [0, 1] on the 1/255 lattice, so that the PNG holds them exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def inked(grid: Image.Image, box) -> bool:
    """Whether any pixel of `box` (left, top, right, bottom) differs from the background."""
    region = np.asarray(grid.convert("RGB").crop(box)).reshape(-1, 3)
    return bool((region != np.array(BACKGROUND)).any())


def test_small_images_scale_up_to_readable_cells_and_the_size_adds_up():
    captions = [f"reward {k}" for k in range(6)]
    grid = labelled_grid(random_images(6), ROWS, PROMPTS, captions)
    g = grid_geometry(64, 64, ROWS, PROMPTS, captions)
    assert (g.scale, g.cell_width, g.cell_height) == (2, 128, 128)  # 64 px -> the smallest whole factor to >= 128 px
    # one line under each image: pitch = cell + caption line + gap
    assert g.pitch_x == 128 + GAP and g.pitch_y > 128 + GAP
    assert grid.size == (g.left + 3 * g.pitch_x, g.top + 2 * g.pitch_y)
    assert g.left > GAP and g.top > GAP  # room for the row names and the prompts
    # large images keep their size
    assert grid_geometry(512, 256, ROWS, PROMPTS).scale == 1


def test_the_images_come_back_exactly():
    images = random_images(6)
    grid = labelled_grid(images, ROWS, PROMPTS, [f"r {k}" for k in range(6)])
    cells = read_cells(grid, grid_geometry(64, 64, ROWS, PROMPTS, [f"r {k}" for k in range(6)]).to_dict())
    expected = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(2, 3, 64, 64, 3).numpy()
    np.testing.assert_array_equal(cells, expected)


def test_labels_are_drawn_where_they_belong():
    captions = [f"reward {k}" for k in range(6)]
    grid = labelled_grid(random_images(6), ROWS, PROMPTS, captions, title="a title")
    g = grid_geometry(64, 64, ROWS, PROMPTS, captions, title="a title")
    for c in range(3):
        x0, y0, x1, y1 = g.cell_box(0, c)
        assert inked(grid, (x0, 0, x1, y0)), f"no prompt over column {c}"
        for r in range(2):
            x0, y0, x1, y1 = g.cell_box(r, c)
            assert inked(grid, (x0, y1, x1, y1 + g.pitch_y - g.cell_height - GAP)), f"no caption under ({r}, {c})"
    for r in range(2):
        _, y0, _, y1 = g.cell_box(r, 0)
        assert inked(grid, (0, y0, g.left - GAP, y1)), f"no name beside row {r}"
    # and nothing where no label is: the gap column right of the last cell
    assert not inked(grid, (g.width - GAP, 0, g.width, g.height))


def test_without_captions_no_caption_band():
    g = grid_geometry(64, 64, ROWS, PROMPTS)
    assert g.pitch_y == 128 + GAP
    grid = labelled_grid(random_images(6), ROWS, PROMPTS)
    assert grid.size == (g.width, g.height)


def test_long_prompts_wrap_within_the_cell_and_are_cut():
    f = font(13)
    lines = fit(LONG, f, 128, MAX_COLUMN_LINES)
    assert len(lines) == MAX_COLUMN_LINES and lines[-1].endswith("...")
    assert all(f.getlength(line) <= 128 for line in lines)
    assert fit("two red circles", f, 128, MAX_COLUMN_LINES) == ["two red circles"]
    assert fit("a\nb", f, 128, 3) == ["a", "b"]
    word = fit("x" * 60, f, 40, 10)  # a word wider than the line is cut by characters
    assert len(word) > 1 and all(f.getlength(line) <= 40 for line in word) and "".join(word) == "x" * 60
    # over the columns: one line for the short prompts, MAX_COLUMN_LINES once one of them is long
    short, long = grid_geometry(64, 64, ROWS, PROMPTS), grid_geometry(64, 64, ROWS, [LONG, *PROMPTS[1:]])
    assert long.top - short.top == (MAX_COLUMN_LINES - 1) * line_height(f)


def test_mismatched_counts_are_refused():
    with pytest.raises(ValueError, match="5 images for 2 rows x 3 columns"):
        labelled_grid(random_images(5), ROWS, PROMPTS)
    with pytest.raises(ValueError, match="2 captions"):
        labelled_grid(random_images(6), ROWS, PROMPTS, ["a", "b"])


def test_log_validation_writes_a_labelled_grid_its_sidecar_and_the_tracker_image(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / "logs"))
    accelerator.init_trackers("grids")
    images = random_images(6)
    rewards = {"base": [1.0, 2.0, 3.0], "trained": [4.5, 5.25, 6.125]}
    log_validation(accelerator, str(tmp_path), 7, images, ROWS, PROMPTS, info={"seeds": [0, 0, 0], "rewards": rewards},
                   scores=rewards)
    accelerator.end_training()
    png, sidecar = tmp_path / "samples" / "validation-step-000007.png", tmp_path / "samples" / "validation-step-000007.json"
    info = json.loads(sidecar.read_text())
    assert {k: info[k] for k in ("step", "rows", "prompts", "seeds", "rewards")} == {
        "step": 7, "rows": ROWS, "prompts": PROMPTS, "seeds": [0, 0, 0], "rewards": rewards}
    g = info["grid"]
    grid = Image.open(png)
    # rows x columns of 128 px cells (64 px scaled by 2), a caption line under each, plus the label margins
    assert (g["rows"], g["cols"], g["cell_width"]) == (2, 3, 128)
    assert grid.size == (g["left"] + 3 * (128 + GAP), g["top"] + 2 * g["pitch_y"])
    assert inked(grid, (0, 0, g["width"], g["top"] - GAP)) and inked(grid, (0, g["top"], g["left"] - GAP, g["height"]))
    np.testing.assert_array_equal(read_cells(png, g)[1, 2], (images[5] * 255).round().to(torch.uint8).permute(1, 2, 0))
    # tensorboard holds the same labelled grid as an image at the step (Mutation this fails under: in
    # utils/train/validation.py log_validation, the tracker's add_image call removed)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "logs" / "grids").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    assert accumulator.Tags()["images"] == ["validation"]
    (logged,) = accumulator.Images("validation")
    assert logged.step == 7 and (logged.width, logged.height) == grid.size
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("RGB")),
                                  np.asarray(grid.convert("RGB")))


def test_a_prompt_drawn_with_two_seeds_has_each_seed_in_its_column_label(tmp_path):
    """Without the seed, two seeds of one prompt would be two columns under one label."""
    from accelerate import Accelerator

    prompts, seeds = ["a red cat", "a red cat", "a blue dog"], [0, 1, 0]
    log_validation(Accelerator(cpu=True), str(tmp_path), 1, random_images(6), ROWS, prompts, info={"seeds": seeds})
    info = json.loads((tmp_path / "samples" / "validation-step-000001.json").read_text())
    assert info["columns"] == ["a red cat (seed 0)", "a red cat (seed 1)", "a blue dog"]
    assert info["prompts"] == prompts
    g, grid = info["grid"], np.asarray(Image.open(tmp_path / "samples" / "validation-step-000001.png").convert("L"))
    pitch = g["cell_width"] + GAP
    heads = [grid[: g["top"] - GAP, g["left"] + c * pitch: g["left"] + c * pitch + g["cell_width"]] for c in range(2)]
    assert not np.array_equal(heads[0], heads[1])  # the two columns' labels are drawn differently

