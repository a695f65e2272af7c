"""utils.cli.ArgumentParser: no abbreviations, and a bad flag is one line naming the closest flag, exit code 2."""
import pytest

from utils.cli import ArgumentParser


def parser():
    p = ArgumentParser(prog="train.py")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--num_seeds", type=int, default=4)
    p.add_argument("--use_lora", action="store_true")
    return p


def error_of(argv, capsys):
    """(exit code, the stderr lines) of parsing `argv`."""
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return exit_info.value.code, captured.err.splitlines()


def test_full_flags_parse_as_argparse_does():
    args = parser().parse_args(["--learning_rate", "1e-3", "--num_seeds", "2", "--use_lora"])
    assert (args.learning_rate, args.num_seeds, args.use_lora) == (1e-3, 2, True)


@pytest.mark.parametrize("argv, line", [
    (["--learning_rat", "1e-3"], "error: unrecognized argument --learning_rat; did you mean --learning_rate?"),
    (["--learning_rat=1e-3"], "error: unrecognized argument --learning_rat; did you mean --learning_rate?"),
    (["--num_seed", "2"], "error: unrecognized argument --num_seed; did you mean --num_seeds?"),
    (["--use_lor"], "error: unrecognized argument --use_lor; did you mean --use_lora?"),
    (["--beta_dpo", "-1"], "error: unrecognized argument --beta_dpo; see --help"),
    (["extra"], "error: unrecognized argument extra"),
])
def test_abbreviation_or_typo_is_one_line_naming_the_closest_flag(argv, line, capsys):
    """A prefix of a flag is refused (argparse's default takes `--num_seed 2` as --num_seeds): exit 2, one line, no
    usage text; a value after an unknown flag (even a negative number) is not reported as a flag."""
    code, lines = error_of(argv, capsys)
    assert code == 2 and lines == [line]


def test_several_unknown_flags_share_the_line(capsys):
    code, lines = error_of(["--learning_rat", "1", "--num_seed", "2"], capsys)
    assert code == 2 and lines == ["error: unrecognized arguments --learning_rat (did you mean --learning_rate?), "
                                   "--num_seed (did you mean --num_seeds?)"]


def test_other_parse_errors_are_one_line_too(capsys):
    code, lines = error_of(["--num_seeds", "two"], capsys)
    assert code == 2 and lines == ["error: argument --num_seeds: invalid int value: 'two'"]


def test_abbreviations_can_be_allowed_explicitly():
    p = ArgumentParser(prog="x", allow_abbrev=True)
    p.add_argument("--num_seeds", type=int)
    assert p.parse_args(["--num_seed", "2"]).num_seeds == 2
