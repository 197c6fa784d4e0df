"""The checks of a number read from a config (loss weights, schedules, learning rates,
shares)."""

import math

__all__ = ["check_number", "check_fraction"]


def _is_number(value) -> bool:
    """An int or a float; a bool is not a number of a config."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(value, key: str, *, zero_allowed: bool) -> None:
    """Fail, naming the key, unless ``value`` is a finite number > 0 (or >= 0 where
    ``zero_allowed``, for weights where 0 switches a term off). Booleans are not numbers here,
    and a NaN is refused: it would pass silently through every comparison (``NaN > 0`` is
    False, so a NaN weight would switch its term off without a word).

    Raises:
        ValueError: naming ``key`` and the value.
    """
    if _is_number(value) and math.isfinite(value) and (value > 0 or (zero_allowed and value == 0)):
        return
    if zero_allowed:
        raise ValueError(f"{key} must be a finite number >= 0 (0: off), got {value!r}")
    raise ValueError(f"{key} must be a finite positive number for training, got {value!r}")


def check_fraction(value, key: str) -> float:
    """``value`` as a float, if it is a number in [0, 1] (a NaN is not; nor is a bool or a
    string, which a comparison would take or fail on with an error that names no key).

    Raises:
        ValueError: naming ``key`` and the value.
    """
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{key} must lie in [0, 1], got {value!r}")
    return float(value)
