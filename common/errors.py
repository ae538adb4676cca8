"""The error a daemon refuses to start with."""
from __future__ import annotations


class StartupError(Exception):
    """A configuration a daemon refuses to start with; the message is one line for the user."""
