"""Secrets this platform generates for itself: created once, random, readable by the owner only.

Configured secrets come from settings (the environment, `.env`, a mounted file); when one is
not configured, the local stack generates it into its stack dir with mode 0600 and every
process on this machine reads the same file. Nothing here logs or returns a secret's path
contents anywhere but to the caller.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def generated_secret(path: Path, prefix: str = "") -> str:
    """The secret in ``path``, created once with a random value and mode 0600."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process wrote it just now
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(prefix + secrets.token_urlsafe(24))
    return path.read_text().strip()
