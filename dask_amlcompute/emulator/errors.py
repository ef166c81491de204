"""Errors the emulator turns into ARM error responses."""

from __future__ import annotations


class ApiError(Exception):
    """An error answered to the client as ARM error JSON.

    Parameters
    ----------
    status : int
        HTTP status code.
    code : str
        ARM error code.
    message : str
        Human-readable message.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
