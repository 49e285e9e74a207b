"""The one exception type of the data layer."""

from __future__ import annotations


class DataError(Exception):
    """Bad input data or data config; `str(error)` is a single line meant for the user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
