"""Content-addressed files on disk: the name of a blob is the sha256 of its bytes.

Both sides keep models and updates this way, so a restarted process finds exactly what it
had and a duplicate write is a no-op. A file whose bytes no longer match its name (a bad
disk, a truncated copy) is detected whenever it is looked up or read, moved aside as
``<sha256>.corrupt`` (kept for inspection, never served) and reported missing, so the blob
is fetched or written again instead of being used.
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

    def _intact(self, sha256: str, data: bytes) -> bool:
        """True when ``data`` is the blob; otherwise its file is moved aside so that it is never used again."""
        if hashlib.sha256(data).hexdigest() == sha256:
            return True
        path = self.path(sha256)
        os.replace(path, path.with_name(f"{sha256}.corrupt"))
        return False

    def put(self, data: bytes) -> str:
        """Store bytes atomically (temp file + rename) and return their sha256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if digest in self:
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
        if not self._intact(sha256, data):
            raise BlobStoreError(f"blob {sha256} in {self.root} was corrupted (its bytes no longer match its sha256); "
                                 f"moved aside to {sha256}.corrupt")
        return data

    def __contains__(self, sha256: str) -> bool:
        """Present and intact (a corrupted file is moved aside and counts as missing)."""
        try:
            return self._intact(sha256, self.path(sha256).read_bytes())
        except FileNotFoundError:
            return False
