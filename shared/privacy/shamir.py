"""Shamir t-of-n secret sharing of byte strings over GF(2^521 - 1).

Secure aggregation needs every site's 32-byte secrets (its self-mask seed and
its mask private key) to be recoverable by any ``t`` surviving sites and by no
coalition of fewer. The field is the Mersenne prime 2^521 - 1 so that a whole
32-byte secret fits in one field element (64-byte chunks are used for longer
secrets); Python's integers make the arithmetic exact without extra
dependencies.

Shares are addressed by their x-coordinate, which secure aggregation sets to the
recipient's round-local site id (a positive integer).

Recombination (:class:`Recombiner`, used by :func:`combine`) does the field
work that depends only on the holders' x-coordinates once: the Lagrange
weights at 0 of the first ``t`` holders (one modular inversion for all of
them, Montgomery's trick) and, when more than ``t`` shares are given, a random
parity check of the Reed-Solomon code the shares form. Every secret held by
the same holders (in secure aggregation: every seed and mask key a round
recovers) then costs two dot products per chunk.

The parity check is a uniformly random codeword ``c`` of the dual code (``c_j
= f(x_j) / prod_{m != j} (x_j - x_m)`` for a random polynomial ``f`` of degree
below ``k - t``): shares ``y`` lying on one polynomial of degree below ``t``
always give ``sum c_j y_j = 0``, and any other ``y`` gives 0 with probability
exactly ``1 / PRIME``, ``c`` being drawn from the OS CSPRNG after the shares
are fixed. A corrupted or foreign share among the ``k`` is therefore detected
except with probability ``2^-521`` per secret, as the exhaustive check (every
extra share against the interpolated polynomial, ``O(k t)`` per chunk) would.
"""

from __future__ import annotations

import operator
import random
import secrets
import struct
from collections.abc import Iterable, Sequence
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

    Shares beyond the first ``t`` are checked for consistency (see the module
    docstring), so a corrupted or mismatched share is reported instead of
    silently yielding a wrong secret. To recover several secrets held by the
    same holders, build one :class:`Recombiner` and reuse it.
    """
    if t < 1:
        raise ShamirError(f"threshold must be >= 1, got {t}")
    return Recombiner([s.x for s in shares], t).combine(shares)


class Recombiner:
    """Recombines any number of secrets whose shares are held by the same ``xs``.

    Construction costs ``O(k^2)`` field multiplications and two modular
    inversions for ``k = len(xs)`` holders; each :meth:`combine` then costs
    ``k + t`` multiplications per 64-byte chunk. ``rng`` (tests only) draws the
    parity check; by default it comes from the OS CSPRNG, which is what makes
    the check sound against shares chosen by an adversary.
    """

    __slots__ = ("_check", "_index", "_weights", "t", "xs")

    def __init__(self, xs: Sequence[int], t: int, rng: random.Random | None = None) -> None:
        if t < 1:
            raise ShamirError(f"threshold must be >= 1, got {t}")
        coords = tuple(int(x) for x in xs)
        if len(set(coords)) != len(coords):
            raise ShamirError("duplicate share x-coordinates")
        if len(coords) < t:
            raise ShamirError(f"need at least {t} shares to recover the secret, got {len(coords)}")
        if not all(0 < x < PRIME for x in coords):
            raise ShamirError("share coordinates are outside the field")
        self.xs = coords
        self.t = t
        self._index = {x: i for i, x in enumerate(coords)}
        self._weights = lagrange_weights_at_zero(coords[:t])
        self._check = _dual_codeword(coords, t, rng) if len(coords) > t else None

    def combine(self, shares: Sequence[Share]) -> bytes:
        """Recover one secret from one share per holder (any order), checking their consistency."""
        shares = self._in_holder_order(shares)
        lengths = {s.secret_length for s in shares}
        counts = {len(s.values) for s in shares}
        if len(lengths) != 1 or len(counts) != 1:
            raise ShamirError("shares belong to different secrets")
        secret_length = lengths.pop()
        if counts.pop() != _chunk_count(secret_length):
            raise ShamirError("share chunk count does not match the secret length")
        weights, check, t = self._weights, self._check, self.t
        out = bytearray()
        remaining = secret_length
        for column in zip(*(s.values for s in shares), strict=True):
            if check is not None and sum(map(operator.mul, check, column)) % PRIME:
                raise ShamirError("shares are inconsistent: at least one is corrupted or foreign")
            chunk = sum(map(operator.mul, weights, column[:t])) % PRIME
            width = min(_CHUNK_BYTES, remaining)
            if chunk >= 1 << (8 * width):
                raise ShamirError("reconstructed value does not fit the secret length")
            out += chunk.to_bytes(width, "big")
            remaining -= width
        return bytes(out)

    def _in_holder_order(self, shares: Sequence[Share]) -> Sequence[Share]:
        if len(shares) == len(self.xs) and all(s.x == x for s, x in zip(shares, self.xs, strict=True)):
            return shares
        ordered: list[Share | None] = [None] * len(self.xs)
        for s in shares:
            i = self._index.get(s.x)
            if i is None or ordered[i] is not None:
                raise ShamirError(f"share from holder {s.x} does not match the expected holders")
            ordered[i] = s
        if any(s is None for s in ordered):
            raise ShamirError(f"expected one share from each of {len(self.xs)} holders, got {len(shares)}")
        return ordered  # type: ignore[return-value]


def lagrange_weights_at_zero(xs: Sequence[int]) -> list[int]:
    """``w_j`` with ``P(0) = sum_j w_j P(x_j)`` for every polynomial ``P`` of degree below ``len(xs)``.

    ``w_j = prod_{m != j} x_m / (x_m - x_j)``: ``O(len(xs)^2)`` multiplications
    and a single modular inversion for all the denominators.
    """
    xs = [x % PRIME for x in xs]
    numerators = _products_except_each(xs)
    denominators = [_product((xm - xj) for m, xm in enumerate(xs) if m != j) for j, xj in enumerate(xs)]
    return [n * d % PRIME for n, d in zip(numerators, batch_inverse(denominators), strict=True)]


def batch_inverse(values: Sequence[int]) -> list[int]:
    """Inverses of non-zero field elements with one modular exponentiation (Montgomery's trick)."""
    prefix = [1] * (len(values) + 1)
    for i, v in enumerate(values):
        prefix[i + 1] = prefix[i] * v % PRIME
    if prefix[-1] == 0:
        raise ShamirError("cannot invert zero: x-coordinates collide in the field")
    inverse = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inverse * prefix[i] % PRIME
        inverse = inverse * values[i] % PRIME
    return out


def _dual_codeword(xs: Sequence[int], t: int, rng: random.Random | None) -> list[int]:
    """A uniformly random codeword of the dual of the length-``len(xs)``, dimension-``t`` RS code."""
    draw = rng.randrange if rng is not None else secrets.randbelow
    coefficients = [0]
    while not any(coefficients):  # the zero codeword would check nothing
        coefficients = [draw(PRIME) for _ in range(len(xs) - t)]
    column_multipliers = batch_inverse(
        [_product((xj - xm) for m, xm in enumerate(xs) if m != j) for j, xj in enumerate(xs)]
    )
    return [v * _evaluate(coefficients, x) % PRIME for v, x in zip(column_multipliers, xs, strict=True)]


def _products_except_each(values: Sequence[int]) -> list[int]:
    suffix = [1] * (len(values) + 1)
    for i in range(len(values) - 1, -1, -1):
        suffix[i] = suffix[i + 1] * values[i] % PRIME
    out, prefix = [], 1
    for i, v in enumerate(values):
        out.append(prefix * suffix[i + 1] % PRIME)
        prefix = prefix * v % PRIME
    return out


def _product(values: Iterable[int]) -> int:
    acc = 1
    for v in values:
        acc = acc * v % PRIME
    return acc


def _evaluate(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc
