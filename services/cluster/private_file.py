"""Secrets on disk: files only their owner may read."""
from __future__ import annotations

import os


def write_private(path: str, text: str) -> None:
    """Write ``text`` to a file only its owner may read (mode 0600 from the moment it exists)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
