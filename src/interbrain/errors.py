"""One exception type for every user-facing error.

The CLI turns an :class:`InterbrainError` into a single line on stderr and a non-zero exit; the message
must name the offending key, value or file.
"""


class InterbrainError(Exception):
    """A user-facing error with a one-line message naming the key, value or file at fault."""


class NonFiniteError(InterbrainError):
    """A NaN or Inf was found; the message names the tensor and the update."""


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise InterbrainError(f"unknown {key} {value!r}; expected one of {', '.join(map(str, choices))}")


def check_positive(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InterbrainError(f"{key} must be a positive number, got {value!r}")
