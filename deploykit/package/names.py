"""Model names become folder and file names on disk and in URLs, so only a safe alphabet is accepted."""

from __future__ import annotations

import re

from deploykit.errors import DeploykitError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_model_name(name: str) -> str:
    """Return `name` if it is safe as a folder name and a URL path segment, else raise one clear sentence."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise DeploykitError(
            f"Model name {name!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, with no path separators or '..'."
        )
    return name
