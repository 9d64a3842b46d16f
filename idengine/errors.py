"""The one error type a user's input can cause, and how its messages name the offending records.

`InputError` says which file, which record or line (or which setting) is wrong and what to do about it; the CLI
turns it into exit code 2. Bugs stay ordinary exceptions.
"""

from __future__ import annotations

from collections.abc import Iterable

SHOW_FIRST = 5
"""How many offending ids an error message lists before giving the count."""


class InputError(ValueError):
    """An input file or setting is unusable as given. The message names the file, the record or setting, and what
    to do. The CLI turns it into exit code 2."""


def describe_ids(ids: Iterable) -> str:
    """`3 id(s): 'a', 'b', 'c'`: the count and the first few offenders, for error messages."""
    ids = list(dict.fromkeys(str(i) for i in ids))
    head = ", ".join(repr(i) for i in ids[:SHOW_FIRST])
    more = f" and {len(ids) - SHOW_FIRST} more" if len(ids) > SHOW_FIRST else ""
    return f"{len(ids)} id(s): {head}{more}"
