"""Chunked transfer of binary payloads (models, updates) over MQTT.

Large messages are slow and memory-hungry on brokers, so a payload travels as chunks of at
most ``chunk_size`` bytes (512 KiB by default: with its header, topic and MQTT framing a
chunk must fit the smallest packet limit brokers ship with, EMQX's 1 MB). Each chunk carries, in its own payload, the
blob id (sha256 of the whole), its index and the chunk count, so routing does not depend on
topics or MQTT 5 properties. The receiver checks every chunk against the manifest, and the
whole against the blob id; a missing chunk can be asked for again with ``ChunkRequest``.
Duplicates are harmless: a chunk already held is ignored.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from shared.protocol import BlobManifest

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 512 * 1024
_MAGIC = b"FMQC"
_HEADER = struct.Struct(">4sB32sII")  # magic, format version, blob sha256, index, count
_VERSION = 1
CHUNK_HEADER_BYTES = _HEADER.size
# The most a chunk's MQTT PUBLISH packet adds to its data: the chunk header (41), the longest chunk
# topic (225: two 63-character names, a 64-character blob id, a 10-digit index) with its length
# (2), the fixed header (5), the packet id (2) and MQTT 5's properties length (1): 276, rounded up.
CHUNK_PACKET_OVERHEAD = 512


def chunk_packet_bytes(chunk_size: int) -> int:
    """The largest MQTT packet a chunk of ``chunk_size`` data bytes travels in: what the broker must accept."""
    return chunk_size + CHUNK_PACKET_OVERHEAD


def largest_chunk_size(max_packet_bytes: int) -> int:
    """The largest chunk size (a whole number of KiB) whose packets a broker accepting ``max_packet_bytes`` takes."""
    return (max_packet_bytes - CHUNK_PACKET_OVERHEAD) // 1024 * 1024


class ChunkError(ValueError):
    """A chunk that cannot belong to any blob we expect, or whose bytes are wrong."""


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def make_manifest(data: bytes, media_type: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> BlobManifest:
    view = memoryview(data)
    hashes = [sha256_hex(view[i:i + chunk_size]) for i in range(0, max(len(data), 1), chunk_size)]
    return BlobManifest(blob_id=sha256_hex(data), size=len(data), chunk_size=chunk_size, chunk_sha256=hashes,
                        media_type=media_type)


def encode_chunk(blob_id: str, index: int, count: int, data: bytes | memoryview) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, bytes.fromhex(blob_id), index, count) + bytes(data)


def decode_chunk(payload: bytes) -> tuple[str, int, int, memoryview]:
    """Split a chunk payload into (blob id, index, count, data) after checking its header."""
    if len(payload) < _HEADER.size:
        raise ChunkError(f"chunk of {len(payload)} bytes is shorter than its {_HEADER.size}-byte header")
    magic, version, blob, index, count = _HEADER.unpack_from(payload)
    if magic != _MAGIC or version != _VERSION:
        raise ChunkError(f"not a fedmq chunk (magic {magic!r}, version {version})")
    if count == 0 or index >= count:
        raise ChunkError(f"chunk index {index} out of range for {count} chunks")
    return blob.hex(), index, count, memoryview(payload)[_HEADER.size:]


def iter_chunks(data: bytes, manifest: BlobManifest, indices: list[int] | None = None) -> Iterator[tuple[int, bytes]]:
    """(index, chunk payload) for the requested chunks (all when ``indices`` is empty or None)."""
    view = memoryview(data)
    wanted = sorted(set(indices)) if indices else range(manifest.count)
    for i in wanted:
        if 0 <= i < manifest.count:
            yield i, encode_chunk(manifest.blob_id, i, manifest.count,
                                  view[i * manifest.chunk_size:(i + 1) * manifest.chunk_size])


@dataclass
class _Assembly:
    manifest: BlobManifest
    buffer: bytearray
    have: set[int] = field(default_factory=set)
    last_progress: float = field(default_factory=time.monotonic)


class BlobInbox:
    """Reassembles blobs whose manifests we expect; bounded so a flood cannot exhaust memory.

    Chunks for a blob not (yet) expected are parked in a small orphan buffer: MQTT gives no
    ordering between the topic that carries a manifest and the topics carrying chunks.
    """

    def __init__(self, *, max_blob_bytes: int, max_orphan_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_blob_bytes = max_blob_bytes
        self.max_orphan_bytes = max_orphan_bytes
        self._assemblies: dict[str, _Assembly] = {}
        self._orphans: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._orphan_bytes = 0
        self._done: OrderedDict[str, None] = OrderedDict()

    def expect(self, manifest: BlobManifest) -> str | None:
        """Start collecting a blob; chunks that arrived early are applied now.

        Returns the blob id when those early chunks already complete it.
        """
        if manifest.size > self.max_blob_bytes:
            raise ChunkError(f"blob {manifest.blob_id[:12]} of {manifest.size} bytes exceeds the "
                             f"{self.max_blob_bytes}-byte limit; raise max_blob_bytes if this model is expected")
        if manifest.blob_id in self._assemblies:
            return None
        self._assemblies[manifest.blob_id] = _Assembly(manifest, bytearray(manifest.size))
        complete = None
        for key in [k for k in self._orphans if k[0] == manifest.blob_id]:
            data = self._orphans.pop(key)
            self._orphan_bytes -= len(data)
            try:
                complete = self._place(manifest.blob_id, key[1], memoryview(data)) or complete
            except ChunkError as e:
                log.warning("dropped an early chunk: %s", e)
        return complete

    def forget(self, blob_id: str) -> None:
        """Stop collecting a blob and release its buffer (its upload was dropped or its round ended)."""
        self._assemblies.pop(blob_id, None)

    def drop_orphans(self) -> None:
        """Release every parked chunk: nothing announced so far will claim them any more."""
        self._orphans.clear()
        self._orphan_bytes = 0

    def known(self, blob_id: str) -> bool:
        """Whether chunks of this blob are wanted (being reassembled) or harmless (recently completed)."""
        return blob_id in self._assemblies or blob_id in self._done

    @property
    def held_bytes(self) -> int:
        """Bytes held for blobs being reassembled plus early chunks parked: what a flood can make us hold."""
        return sum(len(a.buffer) for a in self._assemblies.values()) + self._orphan_bytes

    def offer(self, payload: bytes) -> str | None:
        """Take one chunk payload; returns the blob id when that blob just became complete."""
        blob_id, index, count, data = decode_chunk(payload)
        asm = self._assemblies.get(blob_id)
        if asm is None:
            if blob_id not in self._done:
                self._park(blob_id, index, data)
            return None
        if count != asm.manifest.count:
            raise ChunkError(f"chunk says blob {blob_id[:12]} has {count} chunks, manifest says {asm.manifest.count}")
        return self._place(blob_id, index, data)

    def _park(self, blob_id: str, index: int, data: memoryview) -> None:
        if len(data) > self.max_orphan_bytes:
            return
        old = self._orphans.pop((blob_id, index), None)
        if old is not None:
            self._orphan_bytes -= len(old)
        self._orphans[(blob_id, index)] = bytes(data)
        self._orphan_bytes += len(data)
        while self._orphan_bytes > self.max_orphan_bytes:
            _, old = self._orphans.popitem(last=False)
            self._orphan_bytes -= len(old)

    def _place(self, blob_id: str, index: int, data: memoryview) -> str | None:
        asm = self._assemblies[blob_id]
        if index in asm.have:
            return None
        m = asm.manifest
        if index >= m.count:
            raise ChunkError(f"chunk index {index} out of range: blob {blob_id[:12]} has {m.count} chunks")
        expected = min(m.chunk_size, m.size - index * m.chunk_size)
        if len(data) != expected:
            raise ChunkError(f"chunk {index} of blob {blob_id[:12]} has {len(data)} bytes, the manifest says "
                             f"{expected}; it will be requested again")
        if sha256_hex(data) != m.chunk_sha256[index]:
            raise ChunkError(f"chunk {index} of blob {blob_id[:12]} does not match its sha256 in the manifest; "
                             "it will be requested again")
        start = index * m.chunk_size
        asm.buffer[start:start + len(data)] = data
        asm.have.add(index)
        asm.last_progress = time.monotonic()
        return blob_id if len(asm.have) == m.count else None

    def take(self, blob_id: str) -> bytes:
        """The complete, verified blob; it leaves the inbox."""
        asm = self._assemblies.pop(blob_id)
        data = bytes(asm.buffer)
        if sha256_hex(data) != blob_id:
            raise ChunkError(f"blob {blob_id[:12]} reassembled to bytes with another sha256: its manifest does not "
                             "describe the data; the sender must send a manifest made from the data itself")
        self._done[blob_id] = None
        while len(self._done) > 256:
            self._done.popitem(last=False)
        return data

    def missing(self, blob_id: str) -> list[int]:
        asm = self._assemblies.get(blob_id)
        if asm is None:
            return []
        return [i for i in range(asm.manifest.count) if i not in asm.have]

    def stalled(self, older_than: float) -> list[str]:
        """Blobs with no new chunk for ``older_than`` seconds: candidates for a ``ChunkRequest``."""
        now = time.monotonic()
        stale = [b for b, a in self._assemblies.items() if now - a.last_progress > older_than]
        for b in stale:
            self._assemblies[b].last_progress = now
        return stale

    def pending(self) -> list[str]:
        return list(self._assemblies)


class BlobOutbox:
    """Blobs this side has offered, kept so chunk requests can be answered; least recent evicted."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[str, tuple[BlobManifest, bytes]] = OrderedDict()
        self._bytes = 0

    def add(self, manifest: BlobManifest, data: bytes) -> None:
        if manifest.blob_id in self._blobs:
            self._blobs.move_to_end(manifest.blob_id)
            return
        self._blobs[manifest.blob_id] = (manifest, data)
        self._bytes += len(data)
        while self._bytes > self.max_bytes and len(self._blobs) > 1:
            _, (_, old) = self._blobs.popitem(last=False)
            self._bytes -= len(old)

    def get(self, blob_id: str) -> tuple[BlobManifest, bytes] | None:
        return self._blobs.get(blob_id)
