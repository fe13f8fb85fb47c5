"""Secrets on disk: files only their owner may read."""
from __future__ import annotations

import os
import tempfile


def write_private(path: str, text: str) -> None:
    """Replace ``path`` with a file holding ``text`` that only its owner may read: written to a new file of
    mode 0600 (``mkstemp``: never one that exists, never through a link) in the same directory, then renamed
    over ``path`` (a reader sees the old file or the new one, whole)."""
    fd, staging = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".private-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise
