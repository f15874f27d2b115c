"""Shamir t-of-n secret sharing of byte strings over GF(2^521 - 1).

Secure aggregation needs every site's 32-byte secrets (its self-mask seed and
its mask private key) to be recoverable by any ``t`` surviving sites and by no
coalition of fewer. The field is the Mersenne prime 2^521 - 1 so that a whole
32-byte secret fits in one field element (64-byte chunks are used for longer
secrets); Python's integers make the arithmetic exact without extra
dependencies.

Shares are addressed by their x-coordinate, which secure aggregation sets to the
recipient's round-local site id (a positive integer).
"""

from __future__ import annotations

import random
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1
"""Field modulus: a Mersenne prime, larger than any 64-byte chunk."""

_CHUNK_BYTES = 64
_ELEMENT_BYTES = (PRIME.bit_length() + 7) // 8
_HEADER = struct.Struct(">IHH")  # x, secret length, number of chunks
_MAX_SECRET_BYTES = 0xFFFF


class ShamirError(ValueError):
    """Shares cannot be produced or recombined (too few, inconsistent or malformed)."""


@dataclass(frozen=True, slots=True)
class Share:
    """One holder's point on each chunk polynomial.

    ``secret_length`` travels with the share because a secret with leading zero
    bytes would otherwise lose them on the way through an integer.
    """

    x: int
    values: tuple[int, ...]
    secret_length: int

    def to_bytes(self) -> bytes:
        """Fixed layout so a share can be encrypted to its holder without pickling."""
        header = _HEADER.pack(self.x, self.secret_length, len(self.values))
        return header + b"".join(v.to_bytes(_ELEMENT_BYTES, "big") for v in self.values)

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse a share; a truncated or out-of-field encoding is a ShamirError, not garbage."""
        if len(data) < _HEADER.size:
            raise ShamirError(f"share encoding too short: {len(data)} bytes")
        x, secret_length, count = _HEADER.unpack_from(data)
        expected = _HEADER.size + count * _ELEMENT_BYTES
        if len(data) != expected:
            raise ShamirError(f"share encoding has {len(data)} bytes, expected {expected}")
        if count != _chunk_count(secret_length):
            raise ShamirError(
                f"share claims {count} chunks for a {secret_length}-byte secret"
            )
        values = tuple(
            int.from_bytes(data[off : off + _ELEMENT_BYTES], "big")
            for off in range(_HEADER.size, expected, _ELEMENT_BYTES)
        )
        if x == 0 or any(v >= PRIME for v in values):
            raise ShamirError("share coordinates are outside the field")
        return cls(x=x, values=values, secret_length=secret_length)


def _chunk_count(secret_length: int) -> int:
    return -(-secret_length // _CHUNK_BYTES)


def split(
    secret: bytes,
    n: int,
    t: int,
    rng: random.Random | None = None,
    *,
    xs: Sequence[int] | None = None,
) -> list[Share]:
    """Split ``secret`` so that any ``t`` of the ``n`` shares recover it and fewer reveal nothing.

    ``rng`` defaults to the OS CSPRNG (``secrets``); pass a seeded ``random.Random``
    only in tests, since predictable coefficients void the secrecy. ``xs`` names
    the holders' x-coordinates (default ``1..n``) so that secure aggregation can
    address each share by site id.
    """
    if not isinstance(secret, bytes | bytearray) or not secret:
        raise ShamirError("secret must be non-empty bytes")
    if len(secret) > _MAX_SECRET_BYTES:
        raise ShamirError(f"secret longer than {_MAX_SECRET_BYTES} bytes")
    if not 1 <= t <= n:
        raise ShamirError(f"need 1 <= t <= n, got t={t}, n={n}")
    coords = list(range(1, n + 1)) if xs is None else [int(x) for x in xs]
    if len(coords) != n:
        raise ShamirError(f"{len(coords)} x-coordinates given for {n} shares")
    if len(set(coords)) != n or not all(0 < x < 2**32 for x in coords):
        raise ShamirError("x-coordinates must be distinct integers in [1, 2^32)")
    draw = rng.randrange if rng is not None else secrets.randbelow
    chunks = [
        int.from_bytes(secret[off : off + _CHUNK_BYTES], "big")
        for off in range(0, len(secret), _CHUNK_BYTES)
    ]
    polys = [[c] + [draw(PRIME) for _ in range(t - 1)] for c in chunks]
    return [
        Share(x=x, values=tuple(_evaluate(p, x) for p in polys), secret_length=len(secret))
        for x in coords
    ]


def combine(shares: Sequence[Share], t: int) -> bytes:
    """Recover the secret from at least ``t`` shares.

    Shares beyond the first ``t`` are checked against the interpolated
    polynomial, so a corrupted or mismatched share is reported instead of
    silently yielding a wrong secret.
    """
    if t < 1:
        raise ShamirError(f"threshold must be >= 1, got {t}")
    distinct = {s.x: s for s in shares}
    if len(distinct) != len(shares):
        raise ShamirError("duplicate share x-coordinates")
    if len(shares) < t:
        raise ShamirError(f"need at least {t} shares to recover the secret, got {len(shares)}")
    lengths = {s.secret_length for s in shares}
    counts = {len(s.values) for s in shares}
    if len(lengths) != 1 or len(counts) != 1:
        raise ShamirError("shares belong to different secrets")
    secret_length = lengths.pop()
    if counts.pop() != _chunk_count(secret_length):
        raise ShamirError("share chunk count does not match the secret length")
    basis, extra = list(shares[:t]), list(shares[t:])
    xs = [s.x for s in basis]
    chunks = []
    for i in range(len(basis[0].values)):
        ys = [s.values[i] for s in basis]
        chunks.append(_interpolate(xs, ys, 0))
        if any(_interpolate(xs, ys, s.x) != s.values[i] for s in extra):
            raise ShamirError("shares are inconsistent: at least one is corrupted or foreign")
    out = bytearray()
    remaining = secret_length
    for chunk in chunks:
        width = min(_CHUNK_BYTES, remaining)
        if chunk >= 1 << (8 * width):
            raise ShamirError("reconstructed value does not fit the secret length")
        out += chunk.to_bytes(width, "big")
        remaining -= width
    return bytes(out)


def _evaluate(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def _interpolate(xs: list[int], ys: list[int], at: int) -> int:
    total = 0
    for j, (xj, yj) in enumerate(zip(xs, ys, strict=True)):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % PRIME
                den = den * (xj - xm) % PRIME
        total = (total + yj * num * pow(den, -1, PRIME)) % PRIME
    return total
