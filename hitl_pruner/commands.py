"""Finding a PRUNE or FAIL command in a trial's note."""

from __future__ import annotations

import enum
import re

from optuna.trial import TrialState


def standalone(word: str) -> str:
    """A pattern for ``word`` standing alone: not part of a longer word, nor joined to one.

    ``\b`` is not enough: it treats ``-``, ``'`` and ``.`` as breaks, so "PRUNE-able",
    "FAIL's" and "cfg.PRUNE" would be commands. Here the word must not touch a word character
    (letters, digits, ``_``), nor a ``-``, ``'`` or ``.`` that joins it to a letter or digit on
    the other side. Punctuation that ends or opens a phrase still counts: "PRUNE.", "PRUNE:",
    "PRUNE!", "(FAIL)", "**FAIL**", "'PRUNE'", "- PRUNE".
    """
    joiner = r"[-'.]"
    alnum = r"[^\W_]"
    return rf"(?<!\w)(?<!{alnum}{joiner}){word}(?!\w)(?!{joiner}{alnum})"


# Whole upper-case words only: "does not fail", "pruned layers", "Failure analysis" and
# "PRUNE-able" are ordinary prose and must not end a trial.
DEFAULT_PRUNE_PATTERN = standalone("PRUNE")
DEFAULT_FAIL_PATTERN = standalone("FAIL")


class Command(enum.Enum):
    PRUNE = "PRUNE"
    FAIL = "FAIL"

    @property
    def target(self) -> TrialState:
        return TrialState.PRUNED if self is Command.PRUNE else TrialState.FAIL


class PatternError(ValueError):
    """A user-supplied pattern is not a valid regular expression."""


def compile_pattern(pattern: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PatternError(
            f"{flag} {pattern!r} is not a valid regular expression ({exc}); "
            r"give a Python regular expression such as '\bPRUNE\b'"
        ) from None


class CommandParser:
    """Turns a note's text into the command it carries, if any.

    When both patterns match, the command whose last match ends furthest down the note wins:
    a human who wrote ``PRUNE`` and later appended ``FAIL`` meant FAIL. Equal positions (a
    pattern pair that matches the same text) resolve to FAIL, the stronger verdict.
    """

    def __init__(
        self,
        prune_pattern: str = DEFAULT_PRUNE_PATTERN,
        fail_pattern: str = DEFAULT_FAIL_PATTERN,
    ) -> None:
        self._prune = compile_pattern(prune_pattern, "--prune-pattern")
        self._fail = compile_pattern(fail_pattern, "--fail-pattern")

    def parse(self, note: str) -> Command | None:
        prune_end = _last_match_end(self._prune, note)
        fail_end = _last_match_end(self._fail, note)
        if prune_end is None and fail_end is None:
            return None
        if fail_end is None:
            return Command.PRUNE
        if prune_end is None or fail_end >= prune_end:
            return Command.FAIL
        return Command.PRUNE

    def strip(self, note: str) -> str:
        """The note without its command words, so that ``parse`` finds none (used by Undo).

        A line left blank by the removal (a command on a line of its own) goes with it, and
        trailing blank lines go too; other lines keep their text. A note without a command
        comes back unchanged.
        """
        if self.parse(note) is None:
            return note

        def remove(text: str) -> str:
            # Removing one word can expose another match: repeat until nothing changes.
            for _ in range(8):
                shorter = self._fail.sub("", self._prune.sub("", text))
                if shorter == text:
                    break
                text = shorter
            return text

        lines = []
        for line in note.split("\n"):
            kept = remove(line)
            if kept == line:
                lines.append(line)
            elif kept.strip():
                lines.append(kept.rstrip())
        # A user pattern may span lines; then the whole text is its unit.
        return remove("\n".join(lines)).rstrip()


def _last_match_end(pattern: re.Pattern[str], text: str) -> int | None:
    end = None
    for match in pattern.finditer(text):
        end = match.end()
    return end
