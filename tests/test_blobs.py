"""Chunked blobs: header encoding, reassembly in any order, orphans, corruption and limits."""

from __future__ import annotations

import os
import random
import struct

import pytest

from shared.blobs import (
    BlobInbox,
    BlobOutbox,
    ChunkError,
    decode_chunk,
    encode_chunk,
    iter_chunks,
    make_manifest,
    sha256_hex,
)
from shared.protocol import BlobManifest

CHUNK = 1024


def _blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _chunks(data: bytes, chunk_size: int = CHUNK) -> tuple[BlobManifest, list[bytes]]:
    manifest = make_manifest(data, "application/octet-stream", chunk_size)
    return manifest, [payload for _, payload in iter_chunks(data, manifest)]


def test_manifest_describes_the_data() -> None:
    data = _blob(2500)
    manifest = make_manifest(data, "application/onnx", CHUNK)
    assert manifest.blob_id == sha256_hex(data)
    assert manifest.size == 2500 and manifest.count == 3
    assert manifest.chunk_sha256 == [sha256_hex(data[i:i + CHUNK]) for i in (0, 1024, 2048)]


def test_chunk_header_round_trip() -> None:
    blob_id = sha256_hex(b"whole")
    payload = encode_chunk(blob_id, 6, 7, b"piece of data")
    got_id, index, count, data = decode_chunk(payload)
    assert (got_id, index, count, bytes(data)) == (blob_id, 6, 7, b"piece of data")


def test_iter_chunks_selected_indices() -> None:
    data = _blob(5000)
    manifest = make_manifest(data, "x", CHUNK)
    chunks = dict(iter_chunks(data, manifest, [4, 1, 1, 99, -1]))
    assert sorted(chunks) == [1, 4]
    assert bytes(decode_chunk(chunks[4])[3]) == data[4096:]
    assert len(list(iter_chunks(data, manifest, []))) == manifest.count


def test_decode_rejects_short_payload() -> None:
    with pytest.raises(ChunkError, match="shorter than its 45-byte header"):
        decode_chunk(b"FMQC")


def test_decode_rejects_garbage() -> None:
    with pytest.raises(ChunkError, match="not a fedmq chunk"):
        decode_chunk(os.urandom(100).replace(b"FMQC", b"XXXX"))
    good = encode_chunk("a" * 64, 0, 1, b"d")
    wrong_version = good[:4] + b"\x09" + good[5:]
    with pytest.raises(ChunkError, match="version 9"):
        decode_chunk(wrong_version)


@pytest.mark.parametrize("index,count", [(3, 3), (10, 2), (0, 0)])
def test_decode_rejects_bad_index(index: int, count: int) -> None:
    payload = struct.pack(">4sB32sII", b"FMQC", 1, bytes(32), index, count) + b"data"
    with pytest.raises(ChunkError, match=f"chunk index {index} out of range for {count} chunks"):
        decode_chunk(payload)


def test_reassembles_out_of_order_and_duplicated_chunks() -> None:
    data = _blob(10 * CHUNK + 17)
    manifest, chunks = _chunks(data)
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    assert inbox.expect(manifest) is None
    order = list(range(len(chunks)))
    random.Random(1).shuffle(order)
    results = []
    for i in order[:-1]:
        results.append(inbox.offer(chunks[i]))
        results.append(inbox.offer(chunks[i]))  # a duplicate changes nothing
    assert results == [None] * len(results)
    assert inbox.missing(manifest.blob_id) == [order[-1]]
    assert inbox.offer(chunks[order[-1]]) == manifest.blob_id
    assert inbox.take(manifest.blob_id) == data
    assert inbox.pending() == []
    # late duplicates of a blob already taken are ignored, not parked or restarted
    assert inbox.offer(chunks[0]) is None
    assert inbox.pending() == []


def test_duplicate_of_last_chunk_does_not_complete_twice() -> None:
    data = _blob(3 * CHUNK)
    manifest, chunks = _chunks(data)
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.expect(manifest)
    assert [inbox.offer(c) for c in chunks] == [None, None, manifest.blob_id]
    assert inbox.offer(chunks[2]) is None
    assert inbox.take(manifest.blob_id) == data


def test_empty_blob() -> None:
    manifest, chunks = _chunks(b"")
    assert len(chunks) == 1
    inbox = BlobInbox(max_blob_bytes=10)
    inbox.expect(manifest)
    assert inbox.offer(chunks[0]) == manifest.blob_id
    assert inbox.take(manifest.blob_id) == b""


def test_orphans_complete_the_blob_when_expected() -> None:
    data = _blob(4 * CHUNK)
    manifest, chunks = _chunks(data)
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    for c in reversed(chunks):
        assert inbox.offer(c) is None
    assert inbox.pending() == []
    assert inbox.expect(manifest) == manifest.blob_id
    assert inbox.take(manifest.blob_id) == data


def test_some_orphans_then_the_rest() -> None:
    data = _blob(4 * CHUNK)
    manifest, chunks = _chunks(data)
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.offer(chunks[3])
    inbox.offer(chunks[1])
    inbox.offer(chunks[1])  # duplicate orphan
    assert inbox.expect(manifest) is None
    assert inbox.missing(manifest.blob_id) == [0, 2]
    assert inbox.offer(chunks[0]) is None
    assert inbox.offer(chunks[2]) == manifest.blob_id
    assert inbox.take(manifest.blob_id) == data


def test_expect_twice_is_harmless() -> None:
    manifest, chunks = _chunks(_blob(2 * CHUNK))
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.expect(manifest)
    inbox.offer(chunks[0])
    assert inbox.expect(manifest) is None
    assert inbox.missing(manifest.blob_id) == [1]


def test_wrong_chunk_bytes_raise_and_the_right_chunk_completes_later() -> None:
    data = _blob(3 * CHUNK)
    manifest, chunks = _chunks(data)
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.expect(manifest)
    inbox.offer(chunks[0])
    inbox.offer(chunks[2])
    forged = encode_chunk(manifest.blob_id, 1, manifest.count, b"\x00" * CHUNK)
    with pytest.raises(ChunkError, match=r"chunk 1 of blob .* does not match its sha256"):
        inbox.offer(forged)
    assert inbox.missing(manifest.blob_id) == [1]
    assert inbox.offer(chunks[1]) == manifest.blob_id
    assert inbox.take(manifest.blob_id) == data


def test_chunk_count_disagreeing_with_manifest() -> None:
    data = _blob(2 * CHUNK)
    manifest, _ = _chunks(data)
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.expect(manifest)
    with pytest.raises(ChunkError, match="has 5 chunks, manifest says 2"):
        inbox.offer(encode_chunk(manifest.blob_id, 0, 5, data[:CHUNK]))


def test_bad_orphans_are_dropped_not_fatal() -> None:
    """Early chunks with wrong bytes or an index beyond the manifest must not break expect()."""
    data = _blob(2 * CHUNK)
    manifest, chunks = _chunks(data)
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.offer(encode_chunk(manifest.blob_id, 0, 2, b"wrong"))
    inbox.offer(encode_chunk(manifest.blob_id, 7, 9, b"beyond the manifest"))
    inbox.offer(chunks[1])
    assert inbox.expect(manifest) is None
    assert inbox.missing(manifest.blob_id) == [0]
    assert inbox.offer(chunks[0]) == manifest.blob_id
    assert inbox.take(manifest.blob_id) == data


def test_missing_lists_what_is_missing() -> None:
    manifest, chunks = _chunks(_blob(5 * CHUNK))
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    assert inbox.missing(manifest.blob_id) == []  # not expected at all
    inbox.expect(manifest)
    assert inbox.missing(manifest.blob_id) == [0, 1, 2, 3, 4]
    inbox.offer(chunks[1])
    inbox.offer(chunks[3])
    assert inbox.missing(manifest.blob_id) == [0, 2, 4]
    inbox.forget(manifest.blob_id)
    assert inbox.missing(manifest.blob_id) == []


def test_oversized_manifest_refused() -> None:
    manifest, _ = _chunks(_blob(4 * CHUNK))
    inbox = BlobInbox(max_blob_bytes=4 * CHUNK - 1)
    with pytest.raises(ChunkError, match=f"of {4 * CHUNK} bytes exceeds the {4 * CHUNK - 1}-byte limit"):
        inbox.expect(manifest)
    assert inbox.pending() == []


def test_orphan_buffer_is_bounded_and_keeps_the_newest() -> None:
    inbox = BlobInbox(max_blob_bytes=1 << 20, max_orphan_bytes=3 * CHUNK)
    blobs = [_chunks(_blob(CHUNK, seed)) for seed in range(5)]
    for _, chunks in blobs:
        inbox.offer(chunks[0])
    assert inbox._orphan_bytes <= 3 * CHUNK
    assert len(inbox._orphans) == 3
    # the two oldest were evicted: expecting them finds nothing; the newest complete at once
    assert inbox.expect(blobs[0][0]) is None
    assert inbox.expect(blobs[4][0]) == blobs[4][0].blob_id
    # a single orphan larger than the whole buffer is not kept
    big_manifest, big_chunks = _chunks(_blob(4 * CHUNK), chunk_size=4 * CHUNK)
    inbox.offer(big_chunks[0])
    assert inbox.expect(big_manifest) is None


def test_duplicate_orphans_do_not_leak_buffer_space() -> None:
    inbox = BlobInbox(max_blob_bytes=1 << 20, max_orphan_bytes=3 * CHUNK)
    manifest, chunks = _chunks(_blob(CHUNK))
    for _ in range(10):
        inbox.offer(chunks[0])
    assert inbox._orphan_bytes == CHUNK
    # the buffer still has room for two more orphans after all those duplicates
    others = [_chunks(_blob(CHUNK, seed)) for seed in (11, 12)]
    for _, c in others:
        inbox.offer(c[0])
    assert inbox.expect(manifest) == manifest.blob_id
    assert all(inbox.expect(m) == m.blob_id for m, _ in others)
    assert inbox._orphan_bytes == 0


def test_take_verifies_the_whole_hash() -> None:
    """Chunk hashes can all match while the manifest lies about the whole: take() notices."""
    data = _blob(2 * CHUNK)
    honest, chunks = _chunks(data)
    liar = honest.model_copy(update={"blob_id": sha256_hex(b"something else")})
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.expect(liar)
    for i in range(2):
        payload = encode_chunk(liar.blob_id, i, 2, data[i * CHUNK:(i + 1) * CHUNK])
        last = inbox.offer(payload)
    assert last == liar.blob_id
    with pytest.raises(ChunkError, match="reassembled to bytes with another sha256"):
        inbox.take(liar.blob_id)


def test_stalled_reports_blobs_without_progress() -> None:
    manifest, _ = _chunks(_blob(2 * CHUNK))
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.expect(manifest)
    assert inbox.stalled(older_than=3600) == []
    assert inbox.stalled(older_than=-1) == [manifest.blob_id]


def test_outbox_keeps_recent_blobs_within_budget() -> None:
    outbox = BlobOutbox(max_bytes=2 * CHUNK)
    items = [_chunks(_blob(CHUNK, seed)) for seed in range(3)]
    for seed, (manifest, _) in enumerate(items):
        outbox.add(manifest, _blob(CHUNK, seed))
    assert outbox.get(items[0][0].blob_id) is None
    assert outbox.get(items[2][0].blob_id) == (items[2][0], _blob(CHUNK, 2))
    # a blob larger than the budget is still kept (the newest one always is)
    big = _blob(5 * CHUNK)
    big_manifest = make_manifest(big, "x", CHUNK)
    outbox.add(big_manifest, big)
    assert outbox.get(big_manifest.blob_id) is not None


def test_chunk_longer_than_the_manifest_says_is_refused_and_the_buffer_keeps_its_size() -> None:
    """A sender that lists hashes of oversized chunks must not grow the reassembly buffer past the declared size."""
    data = _blob(2 * CHUNK)
    long_chunk = data[:CHUNK] + b"extra"
    liar = BlobManifest(blob_id=sha256_hex(data), size=len(data), chunk_size=CHUNK,
                        chunk_sha256=[sha256_hex(long_chunk), sha256_hex(data[CHUNK:])], media_type="x")
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    inbox.expect(liar)
    with pytest.raises(ChunkError, match=f"has {CHUNK + 5} bytes, the manifest says {CHUNK};"):
        inbox.offer(encode_chunk(liar.blob_id, 0, 2, long_chunk))
    assert inbox.held_bytes == 2 * CHUNK
    assert inbox.missing(liar.blob_id) == [0, 1]


def test_held_bytes_counts_buffers_and_parked_chunks_until_forgotten() -> None:
    data = _blob(3 * CHUNK)
    manifest, chunks = _chunks(data)
    other, other_chunks = _chunks(_blob(CHUNK, seed=1))
    inbox = BlobInbox(max_blob_bytes=1 << 20)
    assert inbox.held_bytes == 0 and not inbox.known(manifest.blob_id)
    inbox.expect(manifest)
    inbox.offer(other_chunks[0])  # nobody expects it: parked
    assert inbox.known(manifest.blob_id) and not inbox.known(other.blob_id)
    assert inbox.held_bytes == 3 * CHUNK + CHUNK
    inbox.forget(manifest.blob_id)
    assert inbox.held_bytes == CHUNK and inbox.pending() == []
    inbox.expect(manifest)
    for chunk in chunks:
        done = inbox.offer(chunk)
    assert inbox.take(done) == data
    assert inbox.known(manifest.blob_id), "a completed blob's late duplicates are recognised, not parked"
    inbox.offer(chunks[0])
    assert inbox.held_bytes == CHUNK
