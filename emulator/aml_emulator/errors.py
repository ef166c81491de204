"""Errors the emulator turns into ARM error responses."""

from __future__ import annotations


class ApiError(Exception):
    """An error answered to the client as ARM error JSON.

    Parameters
    ----------
    status
        HTTP status code.
    code
        ARM error code.
    message
        Human-readable message.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
