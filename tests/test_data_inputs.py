"""Input files that must not go wrong without a word: unreadable rows of a preference set (counted once, a bad first
row, the start-up probe and --scan_data) and prompt files (encoding, null and blank prompts, prompts longer than the
text encoder reads). Every test reads real files written into its temporary folder."""
import json
import logging
import re

import pytest

import evaluate
import train_dpo
import train_draftp
from conftest import run_main_in_process
from utils import UsageError
from utils.data import PROBE_ROWS, GlobalBatchSampler, ImagePairDataset, load_prompts, select_pairs
from utils.models import load_pipeline_parts, warn_long_prompts
from utils.pairs import scan_dataset
from utils.toy.synthetic import synthetic_preference_rows, write_preference_set
from utils.train.metrics import read_metrics


def truncated_png(data: bytes) -> bytes:
    return data[: len(data) // 2]  # the header reads, the pixels do not: PIL's "image file is truncated"


def preference_set(folder, num_pairs, bad):
    """A saved preference set (datasets' save_to_disk) of `num_pairs` pairs whose rows `bad` hold a truncated PNG."""
    rows = synthetic_preference_rows(num_pairs, seed=0)
    for row in bad:
        rows[row]["jpg_0"] = truncated_png(rows[row]["jpg_0"])
    return write_preference_set(rows, str(folder))


def dpo_args(data, out, *extra):
    return train_dpo.parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", str(data),
                                 "--output_dir", str(out), "--report_to", "none", *map(str, extra)])


# =========================================================================== unreadable rows
# rows 0 and 1 side by side (the first row of the set, and a row whose search for a readable row starts at an
# unreadable one), 7 and 12 alone: 4 unreadable rows of 16
BAD = [0, 1, 7, 12]


def test_each_unreadable_row_is_counted_once_per_pass_on_every_process(tmp_path):
    """Two processes x batch 1 over 16 pairs, two passes over the data: each pass lists each unreadable row exactly
    once in the items' bad_rows, whichever process draws it. Mutation this fails under: in
    ImagePairDataset.__getitem__, list every row the search passes over (`item["bad_rows"]` = the rows of all failed
    candidates): drawing row 0 lists [0, 1] and drawing row 1 lists [1] again, 5 per pass for 4 rows."""
    import datasets

    ds = datasets.load_from_disk(preference_set(tmp_path / "data", 16, BAD))
    rows, winner_first, _ = select_pairs(ds, "label_0")
    dataset = ImagePairDataset(ds, ["jpg_0", "jpg_1"], "caption", rows, winner_first, 8, seed=0)
    samplers = [iter(GlobalBatchSampler(len(dataset), 1, 2, process, seed=0)) for process in (0, 1)]
    for _ in range(2):  # 16 rows / global batch 2: 8 micro-steps are one pass
        listed = [row for _ in range(8) for sampler in samplers for key in next(sampler)
                  for row in dataset[key]["bad_rows"]]
        assert sorted(listed) == BAD


def test_a_run_starts_past_an_unreadable_first_row_and_counts_each_row_once(tmp_path):
    """train_dpo.py on 16 pairs whose rows 0, 1, 7 and 12 are unreadable, one pass (8 steps x 2), --max_bad_rows 4:
    the run starts (the start-up probe reads on to row 2), skips the 4 rows, counts 4 and finishes. Mutations this
    fails under: the start-up probe reading the first row only (utils/data.py `PROBE_ROWS = 1`): "none of the
    first 1 of 16 rows is readable" before the models load; ImagePairDataset.__getitem__ listing every row its
    search passes over: 5 counted, more than --max_bad_rows 4."""
    out = tmp_path / "run"
    log = run_main_in_process(train_dpo, [
        "--pretrained_model_name_or_path", "tiny-sd", "--dataset_name", preference_set(tmp_path / "data", 16, BAD),
        "--output_dir", out, "--resolution", 32, "--train_batch_size", 2, "--max_train_steps", 8, "--max_bad_rows", 4,
        "--use_lora", "--lora_rank", 4, "--report_to", "none", "--validation_steps", 1000, "--checkpointing_steps",
        1000, "--num_inference_steps", 2, "--num_validation_images", 1, "--dataloader_num_workers", 0])
    assert sum(m["bad_rows"] for m in read_metrics(str(out))) == 4
    assert "4 unreadable rows skipped in this run" in log
    assert "row 0: column 'jpg_0' is not a readable image" in log


def test_the_probe_fails_only_when_none_of_the_first_rows_is_readable_and_leaves_scan_data_to_decide(
        tmp_path, fresh_accelerate_state):
    """The first PROBE_ROWS rows unreadable, the 4 after them readable: without --scan_data the run stops before the
    models load, in one line naming the first row's problem and --scan_data; with --scan_data continue the probe
    leaves it to the scan, which drops the PROBE_ROWS rows and keeps the other 4. A set with no readable row at all
    is one line from the probe, and from the scan. Mutations this fails under: open_training_data probing with
    --scan_data as well (`if not args.scan_data:` removed): --scan_data continue stops at the probe; scan_dataset
    without its `if not keep:` check: the scan keeps no row and says nothing."""
    from accelerate import Accelerator

    data = preference_set(tmp_path / "data", PROBE_ROWS + 4, range(PROBE_ROWS))
    expected = (rf"^none of the first {PROBE_ROWS} of {PROBE_ROWS + 4} rows is readable; row 0: column 'jpg_0' is "
                rf"not a readable image.*--dataset_name {re.escape(data)}: .*--scan_data exit")
    with pytest.raises(UsageError, match=expected):
        train_dpo.open_training_data(dpo_args(data, tmp_path / "out"))
    opened = train_dpo.open_training_data(dpo_args(data, tmp_path / "out", "--scan_data", "continue"))
    dataset = ImagePairDataset(opened.ds, opened.image_columns, "caption", opened.rows, opened.winner_first, 8)
    accelerator = Accelerator(cpu=True)
    assert list(scan_dataset(dataset, "continue", 0, accelerator).rows) == list(range(PROBE_ROWS, PROBE_ROWS + 4))

    everything = preference_set(tmp_path / "all_bad", 4, range(4))
    expected = rf"^no row of the data set is readable; row 0: .*--dataset_name {re.escape(everything)}: "
    with pytest.raises(UsageError, match=expected):
        train_dpo.open_training_data(dpo_args(everything, tmp_path / "out"))
    opened = train_dpo.open_training_data(dpo_args(everything, tmp_path / "out", "--scan_data", "continue"))
    dataset = ImagePairDataset(opened.ds, opened.image_columns, "caption", opened.rows, opened.winner_first, 8)
    with pytest.raises(UsageError, match=r"--scan_data continue: all 4 rows are unreadable"):
        scan_dataset(dataset, "continue", 0, accelerator)


# =========================================================================== prompt files
def test_a_prompt_file_that_is_not_utf8_is_one_line_naming_the_file_and_line(tmp_path):
    """A Latin-1 .txt and .jsonl ("café" with the byte 0xe9 on line 2) is refused in one line naming the file, the
    line and UTF-8, through train_draftp.py's flag checks as well; UTF-8 with a byte-order mark and CRLF line ends
    reads as written. Mutation this fails under: in utils/data.py _read_utf8_lines, the try/except around
    `data.decode("utf-8-sig")` removed: a UnicodeDecodeError traceback."""
    txt, jsonl = tmp_path / "latin1.txt", tmp_path / "latin1.jsonl"
    txt.write_bytes("a red cat\nun café au lait\n".encode("latin-1"))
    jsonl.write_bytes('{"prompt": "a red cat"}\n{"prompt": "un café"}\n'.encode("latin-1"))
    for path in (txt, jsonl):
        expected = rf"^--prompts {re.escape(str(path))}: line 2 is not UTF-8 \(byte 0xe9\); prompt files must be UTF-8"
        with pytest.raises(UsageError, match=expected):
            load_prompts(str(path))
    with pytest.raises(UsageError, match="line 2 is not UTF-8"):
        train_draftp.parse_args(["--pretrained_model_name_or_path", "tiny-sd", "--prompts", str(txt),
                                 "--output_dir", str(tmp_path / "out")])
    windows = tmp_path / "windows.txt"
    windows.write_bytes("\ufeffun café\r\na dog\r\n".encode("utf-8"))
    assert load_prompts(str(windows)) == ["un café", "a dog"]


def test_null_and_blank_jsonl_prompts_are_dropped_with_one_warning_and_other_types_refused(tmp_path, caplog):
    """null, "" and "  " prompts of a .jsonl file are dropped, not trained on as "None" or the empty prompt, with
    one warning naming their lines, given once however often the file is loaded; a number is refused in one line.
    Mutation this fails under: load_prompts appending `str(row[column])` for every line (null becomes "None",
    blank prompts stay)."""
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "a red cat"}, {"prompt": None}, {"prompt": ""}, {"prompt": "a blue dog"}, {"prompt": "  "}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="utils.data"):
        assert load_prompts(str(path)) == ["a red cat", "a blue dog"]
        assert load_prompts(str(path)) == ["a red cat", "a blue dog"]
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert warnings == [f"--prompts {path}: dropped 3 null or blank 'prompt' prompts (line 2, line 3, line 5)"]
    path.write_text('{"prompt": "a red cat"}\n{"prompt": 5}\n')
    with pytest.raises(UsageError, match=r"line 2: 'prompt' holds int '5', expected a prompt string"):
        load_prompts(str(path))


LONG = "a photo of a cat " + " ".join(["with a red hat"] * 20)  # 86 words: more than CLIP's 77 tokens


def test_prompts_longer_than_the_text_encoder_reads_are_counted_in_one_warning(tmp_path, caplog,
                                                                               fresh_accelerate_state):
    """warn_long_prompts names how many prompts the tokenizer cuts (the tiny pipelines carry CLIP's tokenizer with
    its 77-token limit), for both SDXL encoders, and stays silent when none is cut; train_draftp.py's and
    evaluate.py's runs warn once. Mutations this fails under: the `warn_long_prompts(parts, prompts)` line removed
    from train_draftp.py's main or from evaluate.py's main (no warning in that run's log); counting
    `length >= limit` or tokenizing with truncation (the count is off)."""
    prompts = ["a red cat", LONG, LONG + " and a dog", "a blue dog"]
    with caplog.at_level(logging.WARNING, logger="utils.models"):
        assert warn_long_prompts(load_pipeline_parts("tiny-sd"), prompts) == {"text_encoder": 2}
        assert warn_long_prompts(load_pipeline_parts("tiny-sdxl"), prompts) == {"text_encoder": 2, "text_encoder_2": 2}
        assert warn_long_prompts(load_pipeline_parts("tiny-sd"), ["a red cat", " ".join(["cat"] * 75)]) == {}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all(m.startswith("2 of 4 prompts are longer than the text encoder reads") for m in
                                      messages)
    assert "text_encoder, text_encoder_2: 2 longer than 77 tokens" in messages[1]

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"a red cat\n{LONG}\n")
    log = run_main_in_process(train_draftp, [
        "--pretrained_model_name_or_path", "tiny-sd", "--prompts", prompts_file, "--reward_model", "brightness",
        "--num_inference_steps", 2, "--truncation_steps", 1, "--resolution", 32, "--train_batch_size", 1,
        "--max_train_steps", 1, "--validation_prompts", "a cat", "--validation_steps", 1000, "--num_validation_images",
        1, "--report_to", "none", "--output_dir", tmp_path / "draftp"])
    assert log.count("1 of 2 prompts are longer than the text encoder reads") == 1, log[-3000:]
    log = run_main_in_process(evaluate, [
        "--pretrained_model_name_or_path", "tiny-sd", "--prompts", prompts_file, "--num_seeds", 1,
        "--num_inference_steps", 2, "--resolution", 32, "--reward_models", "brightness", "--diversity", "none",
        "--output_dir", tmp_path / "evaluate"])
    assert log.count("1 of 2 prompts are longer than the text encoder reads") == 1, log[-3000:]
