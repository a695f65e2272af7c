"""The scripts' command-line parser: argparse without abbreviations, and bad flags answered in one line.

argparse by default takes any unambiguous prefix of a flag (`--learning_rat 1e-3` sets `--learning_rate`), so a
typo can silently set another flag, and answers a flag it does not know with the whole usage text. This parser
refuses prefixes and prints one line naming the closest flag:

    error: unrecognized argument --learning_rat; did you mean --learning_rate?

and exits 2, as argparse does.
"""
import argparse
import difflib
from typing import List, NoReturn, Optional

UNRECOGNIZED = "unrecognized arguments: "  # argparse's message for what no flag consumed


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with `allow_abbrev=False` by default; every parse error is one line on stderr
    (`error: ...`, no usage text) and exit code 2. An unknown flag names the closest known one."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def closest_flag(self, flag: str) -> Optional[str]:
        """The known option string nearest to `flag` (difflib's ratio, at least 0.6), or None."""
        matches = difflib.get_close_matches(flag, list(self._option_string_actions), n=1)
        return matches[0] if matches else None

    def unrecognized_message(self, arguments: List[str]) -> str:
        """'unrecognized argument --x; did you mean --y?' for an unknown flag in `arguments` (the values that follow
        an unknown flag are left out), each flag with its closest one when there are several, or the arguments
        themselves when none of them is a flag."""
        flags = [a.split("=", 1)[0] for a in arguments
                 if a[:1] in self.prefix_chars and len(a) > 1 and not self._negative_number_matcher.match(a)]
        if not flags:
            return f"unrecognized argument{'s' if len(arguments) > 1 else ''} {' '.join(arguments)}"
        closest = {flag: self.closest_flag(flag) for flag in flags}
        if len(flags) == 1:
            flag = flags[0]
            return f"unrecognized argument {flag}; " + (f"did you mean {closest[flag]}?" if closest[flag] else "see --help")
        return "unrecognized arguments " + ", ".join(
            f"{flag} ({f'did you mean {closest[flag]}?' if closest[flag] else 'see --help'})" for flag in flags)

    def error(self, message: str) -> NoReturn:
        if message.startswith(UNRECOGNIZED):
            message = self.unrecognized_message(message[len(UNRECOGNIZED):].split())
        self.exit(2, f"error: {message}\n")

