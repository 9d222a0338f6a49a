"""Files a party keeps to itself: written atomically and owner-only, read back with a clear error.

Keys, prepared queries, ledgers, cached models and valuations all go through :func:`write_private`,
so no reader ever sees half a file and no other user can read one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tip_fed.errors import DataError


def write_private(path: Path, text: str | bytes, mode: int = 0o600) -> None:
    """Atomic write (temp file, fsync, rename) of text or bytes created with ``mode``: readers never
    see half a file, and a crash right after the rename keeps the new contents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8") if isinstance(text, str) else text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_object(path: Path, what: str, fix: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; DataError naming ``what`` and the file (and ``fix``) otherwise."""
    hint = f"; {fix}" if fix else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} {path} is not valid JSON: {exc}{hint}") from None
    if not isinstance(data, dict):
        raise DataError(f"{what} {path} must hold a JSON object{hint}")
    return data
