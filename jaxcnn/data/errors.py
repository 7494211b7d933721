"""The one exception type for every data problem a user can run into."""

from __future__ import annotations

import os


class DataError(Exception):
    """A data file or data source that cannot be used; ``str(error)`` is the whole readable message.

    The message names the file or source, says what was expected and what was found, and says what
    to do about it, so a command-line tool can print it as it is, without a traceback.
    ``problem`` and ``remedy`` hold the two parts separately, for callers that give their own advice.
    """

    def __init__(self, problem: str, *, remedy: str = ""):
        separator = "\n" if "\n" in problem else " "
        super().__init__(f"{problem}{separator}{remedy}" if remedy else problem)
        self.problem = problem
        self.remedy = remedy


def file_error(path: str | os.PathLike, problem: str, *, expected: str, found: str, remedy: str) -> DataError:
    """Builds a :class:`DataError` of the form ``"<path>: <problem>: expected ..., found .... <remedy>"``."""
    return DataError(f"{os.fspath(path)}: {problem}: expected {expected}, found {found}.", remedy=remedy)
