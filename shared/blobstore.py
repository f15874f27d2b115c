"""Content-addressed files on disk: the name of a blob is the sha256 of its bytes.

Both sides keep models and updates this way, so a restarted process finds exactly what it
had, a duplicate write is a no-op, and a corrupted file is detected on read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class BlobStoreError(RuntimeError):
    """A blob is missing or its bytes no longer match its name."""


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store bytes atomically (temp file + rename) and return their sha256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobStoreError(f"blob {sha256} is not in {self.root}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobStoreError(f"blob {sha256} in {self.root} is corrupted (hash mismatch); delete it so it is "
                                 "fetched again")
        return data

    def __contains__(self, sha256: str) -> bool:
        return self.path(sha256).exists()
