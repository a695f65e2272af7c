"""When validation grids are drawn, and how they are written (samples/ and the trackers)."""
import os

from ..grids import format_score, save_grid


def validation_wanted(args) -> bool:
    """Validation grids were asked for: --validation_prompts given, or --validation_steps within the run."""
    return bool(args.validation_prompts) or args.validation_steps <= args.max_train_steps


def validation_due(args, global_step: int) -> bool:
    """A grid after this step, inside the loop: a multiple of --validation_steps before the last step (the last
    one is drawn after the final weights are saved, when `validation_wanted`)."""
    return validation_wanted(args) and global_step % args.validation_steps == 0 and global_step < args.max_train_steps


def column_labels(prompts, seeds=None):
    """Each column's label: its prompt, and "(seed N)" after a prompt that more than one column shows."""
    if seeds is None:
        return list(prompts)
    return [f"{p} (seed {s})" if prompts.count(p) > 1 else p for p, s in zip(prompts, seeds)]


def log_validation(accelerator, output_dir, step, images, rows, prompts, info: dict, scores=None, score_name="reward",
                   tag="validation"):
    """Write samples/<tag>-step-N.png: `images` (len(rows) * len(prompts), 3, H, W) in [0,1], one row per name of
    `rows`, labelled with each prompt over its column, the row names beside the rows and, where `scores` ({row
    name: [score per prompt]}) has the row, "<score_name> <score>" under each image. A sidecar json holds step,
    rows, prompts, `info` (seeds, rewards or scores) and the grid's geometry (utils.grids.read_cells gets the
    exact images back). A prompt drawn with several seeds (info["seeds"], one per column) has the seed in its column's
    label, so that its columns are told apart. The trackers get the same labelled grid."""
    columns = column_labels(prompts, info.get("seeds"))
    captions = None  # no caption line at all without scores (DPO without --choice_model)
    if scores:
        captions = [f"{score_name} {format_score(scores[name][k])}" if name in scores else ""
                    for name in rows for k in range(len(prompts))]
    grid = save_grid(os.path.join(output_dir, "samples", f"{tag}-step-{step:06d}"), images, rows, columns, captions,
                     sidecar={"step": step, "rows": rows, "prompts": prompts, "columns": columns, **info})
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(grid)}, step=step)
