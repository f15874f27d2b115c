"""Secure aggregation of quantized updates, after Bonawitz et al. (CCS 2017).

The orchestrator must learn the *sum* of the sites' updates and nothing about
any single one, even when some sites drop out mid-round. Each site adds to its
fixed-point update a self mask ``PRG(b_i)`` and, for every peer ``j``, a
pairwise mask ``+PRG(s_ij)`` if ``i < j`` or ``-PRG(s_ij)`` if ``i > j``
(arithmetic mod 2^32). Pairwise masks cancel in the sum; the secrets needed to
remove what does not cancel are Shamir-shared among the sites beforehand.

Steps (site = :class:`SecAggClient`, server = :class:`SecAggServer`):

0. site ``advertise``: two fresh X25519 public keys signed with its identity
   key; server ``collect_advertisements`` verifies them and broadcasts U1.
1. site ``share_keys``: verifies U1, Shamir-splits ``b_i`` and its mask private
   key, encrypts one share pair per peer; server ``route_shares`` relays the
   ciphertexts (their senders form U2).
2. site ``mask_input``: opens its shares, sends the masked vector; server
   ``collect_masked`` -> survivors U3 (or aborts below the threshold).
3. site ``unmask``: shares of ``b_j`` for j in U3 and of the mask key for j in
   U2 \\ U3; server ``unmask`` reconstructs them and returns the sum.

Design decisions:

* Two independent X25519 key pairs per site and round, as in the paper: the
  mask key of a site that drops out is reconstructed by the server, which must
  not also open the channel its shares were encrypted on.
* Key advertisements are signed with the site's identity key (Ed25519 or
  ECDSA P-256/SHA-256) over the round id, site id and both public keys, so the
  server cannot substitute keys (man in the middle) or replay another round's.
* Every key derivation is HKDF-SHA256 with the round id and the pair of site
  ids in its context. The PRG is AES-256-CTR (``cryptography``, AES-NI),
  expanded straight into little-endian uint32 so masks are vectorised.
* The threshold ``t`` must be a strict majority of U1 and each site answers
  the unmasking request once, refusing if the survivor list is inconsistent
  with what it saw; together these stop the server from obtaining both
  ``b_i`` and the mask key of the same site.
* Not implemented: the paper's ConsistencyCheck round against a server that
  shows different survivor lists to different sites. The server here is
  trusted to follow the protocol (honest but curious) except that it cannot
  forge keys.

Site ids are round-local positive integers (the round engine maps hospitals to
them); they double as Shamir x-coordinates and define the mask signs.

Fixed point: :func:`quantize` maps coordinates in ``[-bound, bound]`` to
two's-complement integers with at most ``(2^31 - 1) // num_sites`` magnitude,
so the modular sum of up to ``num_sites`` contributions is exact and
:func:`dequantize` recovers it without wrap-around.

Sparse mode: :func:`round_index_set` gives every site the same ``k`` positions
for the round; sites gather their dense vector at those positions and run the
protocol on length ``k``, so masks are generated only there and the masked
vectors stay ``k`` long. (Top-k sparsification cannot be combined with
masking: each site would pick different positions.)
"""

from __future__ import annotations

import enum
import numbers
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.privacy import shamir

IdentityPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
IdentityPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

_LABEL = b"fedmq/secagg/v1/"
_SEED_BYTES = 32
_KEY_BYTES = 32
_NONCE_BYTES = 12
_MASK_DTYPE = np.dtype("<u4")
_INT32_MAX = 2**31 - 1


class SecAggError(Exception):
    """The round cannot proceed securely; no partial result is produced."""


# --------------------------------------------------------------------------- fixed point


def quantize(
    values: np.ndarray, bound: float, num_sites: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Map a float vector to the uint32 ring so that ``num_sites`` of them sum without wrapping.

    Coordinates are saturated at ``±bound``: after L2 clipping to ``C`` every
    coordinate is within ``C``, but distributed DP noise can push a few beyond,
    so choose ``bound`` with headroom for it. With ``rng`` the rounding is
    stochastic and therefore unbiased; without it, round-to-nearest.
    """
    limit, scale = _fixed_point(bound, num_sites)
    values = np.asarray(values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.floating):
        raise ValueError("values must be a 1-D floating-point array")
    if not np.all(np.isfinite(values)):
        raise ValueError("values contain NaN or infinity")
    scaled = np.clip(values.astype(np.float64), -bound, bound) * scale
    rounded = np.floor(scaled + rng.random(scaled.shape)) if rng is not None else np.rint(scaled)
    return np.clip(rounded, -limit, limit).astype(np.int32).view(np.uint32)


def dequantize(total: np.ndarray, bound: float, num_sites: int) -> np.ndarray:
    """Turn a modular sum of :func:`quantize` outputs back into floats.

    ``bound`` and ``num_sites`` must be those the sites quantized with
    (``num_sites`` is the maximum number of contributions, not the number of
    survivors).
    """
    _, scale = _fixed_point(bound, num_sites)
    total = _as_ring_vector(total, None)
    return total.astype(np.uint32).view(np.int32).astype(np.float64) / scale


def _fixed_point(bound: float, num_sites: int) -> tuple[int, float]:
    if not (isinstance(bound, numbers.Real) and np.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a positive finite number, got {bound!r}")
    if not isinstance(num_sites, int) or not 1 <= num_sites <= _INT32_MAX:
        raise ValueError(f"num_sites must be a positive int, got {num_sites!r}")
    limit = _INT32_MAX // num_sites
    return limit, limit / bound


# --------------------------------------------------------------------------- PRG, index sets


def prg_uint32(seed: bytes, length: int) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` pseudorandom uint32 values (AES-256-CTR keystream).

    The keystream is written directly into the array's buffer, so the cost is
    one AES pass (about 2 GB/s with AES-NI) and no per-element Python loop.
    """
    if not isinstance(seed, bytes) or len(seed) != _SEED_BYTES:
        raise ValueError(f"PRG seed must be {_SEED_BYTES} bytes")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    return _prg_into(seed, _prg_scratch(length), length)


# AES-CTR encrypts zeros into the keystream. The zeros are one shared 64 KiB block fed
# chunk by chunk (CTR continues across update calls) rather than a fresh zeroed array per
# call, whose page faults cost about as much as the AES pass itself at 100k coordinates.
_ZERO_BLOCK = memoryview(bytes(1 << 16))
_CTR_SLACK = 15  # update_into wants block_size - 1 spare output bytes


def _prg_scratch(length: int) -> np.ndarray:
    """An output buffer for :func:`_prg_into`; reuse one across the masks of a vector."""
    return np.empty(4 * length + _CTR_SLACK, dtype=np.uint8)


def _prg_into(seed: bytes, scratch: np.ndarray, length: int) -> np.ndarray:
    """:func:`prg_uint32` into ``scratch`` (from :func:`_prg_scratch`); the result is a view of it."""
    nbytes = 4 * length
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    step = len(_ZERO_BLOCK)
    for offset in range(0, nbytes, step):
        size = min(step, nbytes - offset)
        encryptor.update_into(_ZERO_BLOCK[:size], scratch[offset : offset + size + _CTR_SLACK])
    return scratch[:nbytes].view(_MASK_DTYPE)


def round_index_set(round_seed: bytes, length: int, k: int) -> np.ndarray:
    """The ``k`` positions (sorted, out of ``length``) that every site masks and sends this round.

    Every site must obtain bit-identical indices from the same seed, on any
    numpy version, so the selection is the ``k`` smallest of per-position
    AES-CTR keys with the position in the low bits (all keys distinct, hence
    a unique answer) rather than a numpy random API whose streams may change.
    """
    if not isinstance(round_seed, bytes) or len(round_seed) < 16:
        raise ValueError("round_seed must be at least 16 bytes")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not isinstance(k, int) or not 1 <= k <= length:
        raise ValueError(f"k must be an int in [1, length={length}], got {k!r}")
    if k == length:
        return np.arange(length, dtype=np.int64)
    key = _hkdf(round_seed, b"index-set")
    raw = prg_uint32(key, 2 * length).view("<u8").astype(np.uint64)
    shift = np.uint64(max(1, (length - 1).bit_length()))
    keys = ((raw >> shift) << shift) | np.arange(length, dtype=np.uint64)
    return np.sort(np.argpartition(keys, k - 1)[:k]).astype(np.int64)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class RoundConfig:
    """What every participant of one secure-aggregation round must agree on."""

    round_id: bytes
    threshold: int
    vector_length: int

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, bytes) or not self.round_id:
            raise ValueError("round_id must be non-empty bytes (e.g. federation id + round number)")
        if not isinstance(self.threshold, int) or self.threshold < 2:
            raise ValueError(f"threshold must be an int >= 2, got {self.threshold!r}")
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ValueError(f"vector_length must be a positive int, got {self.vector_length!r}")


@dataclass(frozen=True, slots=True)
class KeyAdvertisement:
    """Step 0, site -> server -> all sites: the round's public keys, signed by the site's identity."""

    site_id: int
    encryption_public: bytes
    mask_public: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class EncryptedShares:
    """Step 1, site -> server -> peer: the sender's shares for the recipient, opaque to the server."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """Step 2, site -> server: the masked uint32 vector."""

    site_id: int
    vector: np.ndarray


@dataclass(frozen=True, slots=True)
class UnmaskingResponse:
    """Step 3, site -> server: self-seed shares of survivors, mask-key shares of dropped sites."""

    site_id: int
    self_seed_shares: Mapping[int, shamir.Share]
    mask_key_shares: Mapping[int, shamir.Share]


class _Stage(enum.Enum):
    ADVERTISE = enum.auto()
    SHARE = enum.auto()
    MASK = enum.auto()
    UNMASK = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


class _StepOrder:
    """Each protocol step runs once and in order: a repeated step could leak a second share set."""

    def __init__(self, first: _Stage) -> None:
        self.stage = first

    def enter(self, expected: _Stage, step: str) -> None:
        if self.stage is not expected:
            raise SecAggError(f"{step} called in stage {self.stage.name}, expected {expected.name}")

    def fail(self, message: str) -> SecAggError:
        self.stage = _Stage.FAILED
        return SecAggError(message)


# --------------------------------------------------------------------------- site


class SecAggClient:
    """One site's side of one round. Create a fresh instance per round: keys are single-use."""

    def __init__(self, site_id: int, config: RoundConfig, identity_key: IdentityPrivateKey) -> None:
        _check_site_id(site_id)
        self.site_id = site_id
        self.config = config
        self._order = _StepOrder(_Stage.SHARE)
        self._encryption_key = x25519.X25519PrivateKey.generate()
        self._mask_key = x25519.X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(_SEED_BYTES)
        encryption_public = _raw_public(self._encryption_key)
        mask_public = _raw_public(self._mask_key)
        message = _advertisement_message(config.round_id, site_id, encryption_public, mask_public)
        self._advertisement = KeyAdvertisement(
            site_id, encryption_public, mask_public, _sign(identity_key, message)
        )
        self._peers: dict[int, KeyAdvertisement] = {}
        self._seed_shares: dict[int, shamir.Share] = {}
        self._mask_key_shares: dict[int, shamir.Share] = {}
        self._share_keys: dict[int, bytes] = {}  # per peer, derived once for both directions

    def advertise(self) -> KeyAdvertisement:
        """Step 0: this round's signed public keys, to send (or resend) to the server."""
        return self._advertisement

    def share_keys(
        self,
        advertisements: Sequence[KeyAdvertisement],
        identity_keys: Mapping[int, IdentityPublicKey],
    ) -> list[EncryptedShares]:
        """Step 1: check the server's list U1 and send each peer its encrypted shares.

        ``identity_keys`` maps site id to the public key from that site's
        certificate; every advertisement must verify against it.
        """
        self._order.enter(_Stage.SHARE, "share_keys")
        try:
            peers = _verify_roster(advertisements, identity_keys, self.config)
        except SecAggError as err:
            raise self._order.fail(str(err)) from err
        if peers.get(self.site_id) != self._advertisement:
            raise self._order.fail("the server's key list misrepresents this site's own keys")
        self._peers = peers
        holders = sorted(peers)
        t = self.config.threshold
        mask_shares = shamir.split(_raw_private(self._mask_key), len(holders), t, xs=holders)
        seed_shares = shamir.split(self._self_seed, len(holders), t, xs=holders)
        outgoing = []
        for holder, mask_share, seed_share in zip(holders, mask_shares, seed_shares, strict=True):
            if holder == self.site_id:
                self._mask_key_shares[holder] = mask_share
                self._seed_shares[holder] = seed_share
                continue
            key = self._share_key(holder)
            nonce = secrets.token_bytes(_NONCE_BYTES)
            plaintext = _frame(mask_share.to_bytes()) + _frame(seed_share.to_bytes())
            aad = _share_aad(self.config.round_id, self.site_id, holder)
            outgoing.append(
                EncryptedShares(self.site_id, holder, nonce, AESGCM(key).encrypt(nonce, plaintext, aad))
            )
        self._order.stage = _Stage.MASK
        return outgoing

    def mask_input(self, vector: np.ndarray, received: Sequence[EncryptedShares]) -> MaskedInput:
        """Step 2: open the shares peers sent (their senders form U2) and mask the quantized input.

        ``vector`` is this site's :func:`quantize` output (uint32, the round's
        vector length); masks are added only towards peers in U2, since only
        their shares could let the server remove them.
        """
        self._order.enter(_Stage.MASK, "mask_input")
        vector = _as_ring_vector(vector, self.config.vector_length)
        try:
            self._open_shares(received)
        except SecAggError as err:
            raise self._order.fail(str(err)) from err
        self._share_keys.clear()  # no longer needed once the shares are open
        u2 = set(self._mask_key_shares)
        if len(u2) < self.config.threshold:
            raise self._order.fail(
                f"only {len(u2)} sites shared keys, below the threshold {self.config.threshold}"
            )
        masked = vector.astype(np.uint32, copy=True)
        scratch = _prg_scratch(masked.size)  # one keystream buffer for all n masks
        np.add(masked, _prg_into(self._self_seed, scratch, masked.size), out=masked)
        for peer in sorted(u2 - {self.site_id}):
            seed = _pairwise_seed(
                self._mask_key, self._peers[peer].mask_public, self.config.round_id, self.site_id, peer
            )
            mask = _prg_into(seed, scratch, masked.size)
            (np.add if self.site_id < peer else np.subtract)(masked, mask, out=masked)
        self._order.stage = _Stage.UNMASK
        return MaskedInput(self.site_id, masked)

    def unmask(self, survivors: Collection[int]) -> UnmaskingResponse:
        """Step 3: reveal self-seed shares of survivors and mask-key shares of the dropped, once.

        Refuses if the survivor list cannot be right (it omits this site, names
        a site that never shared keys, or is below the threshold), because
        answering such a list could hand the server both secrets of one site.
        """
        self._order.enter(_Stage.UNMASK, "unmask")
        u3 = set(survivors)
        u2 = set(self._mask_key_shares)
        if self.site_id not in u3:
            raise self._order.fail("survivor list omits this site although it sent its masked input")
        if not u3 <= u2:
            raise self._order.fail(f"survivor list names sites {sorted(u3 - u2)} that never shared keys")
        if len(u3) < self.config.threshold:
            raise self._order.fail(
                f"only {len(u3)} survivors, below the threshold {self.config.threshold}; revealing nothing"
            )
        self._order.stage = _Stage.DONE
        return UnmaskingResponse(
            self.site_id,
            {j: self._seed_shares[j] for j in sorted(u3)},
            {j: self._mask_key_shares[j] for j in sorted(u2 - u3)},
        )

    def _share_key(self, peer: int) -> bytes:
        """The pair's share-encryption key; symmetric, so the key that encrypted this site's shares
        to ``peer`` also opens ``peer``'s: one X25519 + HKDF per peer and round, not two."""
        key = self._share_keys.get(peer)
        if key is None:
            public = self._peers[peer].encryption_public
            key = _derive_pair_key(
                self._encryption_key, public, b"share-encryption", self.config.round_id, self.site_id, peer
            )
            self._share_keys[peer] = key
        return key

    def _open_shares(self, received: Sequence[EncryptedShares]) -> None:
        for item in received:
            if item.recipient != self.site_id:
                raise SecAggError(f"received shares addressed to site {item.recipient}")
            if item.sender not in self._peers or item.sender == self.site_id:
                raise SecAggError(f"received shares from site {item.sender}, which is not a peer")
            if item.sender in self._mask_key_shares:
                raise SecAggError(f"received two share sets from site {item.sender}")
            aad = _share_aad(self.config.round_id, item.sender, self.site_id)
            try:
                plaintext = AESGCM(self._share_key(item.sender)).decrypt(item.nonce, item.ciphertext, aad)
                mask_blob, seed_blob = _unframe_pair(plaintext)
                mask_share = shamir.Share.from_bytes(mask_blob)
                seed_share = shamir.Share.from_bytes(seed_blob)
            except (InvalidTag, ValueError) as err:
                raise SecAggError(f"shares from site {item.sender} failed authentication or parsing") from err
            if mask_share.x != self.site_id or seed_share.x != self.site_id:
                raise SecAggError(f"shares from site {item.sender} are addressed to another holder")
            self._mask_key_shares[item.sender] = mask_share
            self._seed_shares[item.sender] = seed_share


# --------------------------------------------------------------------------- server


class SecAggServer:
    """The orchestrator's side of one round: relays, tracks U1 ⊇ U2 ⊇ U3, and unmasks the sum."""

    def __init__(self, config: RoundConfig, identity_keys: Mapping[int, IdentityPublicKey]) -> None:
        self.config = config
        self._identity_keys = dict(identity_keys)
        self._order = _StepOrder(_Stage.ADVERTISE)
        self._roster: dict[int, KeyAdvertisement] = {}
        self._u2: set[int] = set()
        self._masked: dict[int, np.ndarray] = {}

    def collect_advertisements(self, advertisements: Sequence[KeyAdvertisement]) -> list[KeyAdvertisement]:
        """Step 0: verify the advertisements and return U1, the list to broadcast to every site in it."""
        self._order.enter(_Stage.ADVERTISE, "collect_advertisements")
        try:
            self._roster = _verify_roster(advertisements, self._identity_keys, self.config)
        except SecAggError as err:
            raise self._order.fail(str(err)) from err
        self._order.stage = _Stage.SHARE
        return [self._roster[s] for s in sorted(self._roster)]

    def route_shares(self, shares: Iterable[EncryptedShares]) -> dict[int, list[EncryptedShares]]:
        """Step 1: group ciphertexts by recipient; senders with a complete set form U2.

        The result maps each site in U2 to the shares it must receive; shares
        for sites that sent none themselves are dropped with those sites.
        """
        self._order.enter(_Stage.SHARE, "route_shares")
        # Linear in the number of messages: one pass to group, one to check, one to route.
        by_sender: dict[int, list[EncryptedShares]] = {}
        for item in shares:
            by_sender.setdefault(item.sender, []).append(item)
        peers_of_everyone = len(self._roster) - 1
        for sender, items in by_sender.items():
            if sender not in self._roster:
                raise self._order.fail(f"shares from site {sender}, which is not in U1")
            recipients = {i.recipient for i in items}
            if (
                len(items) != peers_of_everyone
                or len(recipients) != peers_of_everyone
                or sender in recipients
                or not recipients <= self._roster.keys()
            ):
                raise self._order.fail(f"site {sender} did not send exactly one share set to each peer in U1")
        self._u2 = set(by_sender)
        if len(self._u2) < self.config.threshold:
            raise self._order.fail(
                f"only {len(self._u2)} sites shared keys, below the threshold {self.config.threshold}"
            )
        self._order.stage = _Stage.MASK
        routed: dict[int, list[EncryptedShares]] = {recipient: [] for recipient in sorted(self._u2)}
        for sender in sorted(self._u2):  # each recipient's list ordered by sender, as before
            for item in by_sender[sender]:
                inbox = routed.get(item.recipient)
                if inbox is not None:
                    inbox.append(item)
        return routed

    def collect_masked(self, inputs: Sequence[MaskedInput]) -> list[int]:
        """Step 2: accept masked vectors; return U3, the survivors to ask for unmasking shares.

        Below the threshold the round is aborted here, before any share is
        requested, so nothing about any input is revealed.
        """
        self._order.enter(_Stage.MASK, "collect_masked")
        masked: dict[int, np.ndarray] = {}
        for item in inputs:
            if item.site_id not in self._u2 or item.site_id in masked:
                raise self._order.fail(f"unexpected or repeated masked input from site {item.site_id}")
            try:
                masked[item.site_id] = _as_ring_vector(item.vector, self.config.vector_length)
            except ValueError as err:
                raise self._order.fail(f"site {item.site_id}: {err}") from err
        if len(masked) < self.config.threshold:
            raise self._order.fail(
                f"only {len(masked)} masked inputs, below the threshold {self.config.threshold}: "
                "round aborted, nothing revealed"
            )
        self._masked = masked
        self._order.stage = _Stage.UNMASK
        return sorted(masked)

    def unmask(self, responses: Sequence[UnmaskingResponse]) -> np.ndarray:
        """Step 3: reconstruct the needed secrets, strip all masks and return the uint32 sum of U3."""
        self._order.enter(_Stage.UNMASK, "unmask")
        try:
            total = self._unmask(responses)
        except (SecAggError, shamir.ShamirError) as err:
            raise self._order.fail(f"unmasking failed: {err}") from err
        self._order.stage = _Stage.DONE
        return total

    def _unmask(self, responses: Sequence[UnmaskingResponse]) -> np.ndarray:
        t = self.config.threshold
        u3 = set(self._masked)
        dropped = self._u2 - u3
        responders = [r.site_id for r in responses]
        if len(set(responders)) != len(responders) or not set(responders) <= u3:
            raise SecAggError("unmasking responses must come from distinct survivors")
        if len(responses) < t:
            raise SecAggError(f"only {len(responses)} unmasking responses, below the threshold {t}")
        for r in responses:
            if set(r.self_seed_shares) != u3 or set(r.mask_key_shares) != dropped:
                raise SecAggError(f"site {r.site_id} answered for the wrong set of sites")
            if any(s.x != r.site_id for s in (*r.self_seed_shares.values(), *r.mask_key_shares.values())):
                raise SecAggError(f"site {r.site_id} returned shares that are not its own")
        # Every secret recovered here is held by the same responders: the Lagrange weights and
        # the consistency check depend only on their ids, so they are computed once per round.
        recombiner = shamir.Recombiner(responders, t)
        total = np.zeros(self.config.vector_length, dtype=np.uint32)
        scratch = _prg_scratch(total.size)  # one keystream buffer for every mask removed
        for site, vector in self._masked.items():
            np.add(total, vector, out=total)
            seed = _recombine(recombiner, [r.self_seed_shares[site] for r in responses], "self seed", site)
            np.subtract(total, _prg_into(seed, scratch, total.size), out=total)
        for gone in sorted(dropped):
            raw = _recombine(recombiner, [r.mask_key_shares[gone] for r in responses], "mask key", gone)
            mask_key = x25519.X25519PrivateKey.from_private_bytes(raw)
            if _raw_public(mask_key) != self._roster[gone].mask_public:
                raise SecAggError(f"reconstructed mask key of site {gone} does not match its advertisement")
            for site in sorted(u3):
                # Survivor ``site`` added +PRG if site < gone, -PRG otherwise; undo exactly that.
                # Per (dropped, survivor) pair one X25519 + HKDF + PRG pass: inherent to the protocol.
                seed = _pairwise_seed(mask_key, self._roster[site].mask_public, self.config.round_id, site, gone)
                mask = _prg_into(seed, scratch, total.size)
                (np.subtract if site < gone else np.add)(total, mask, out=total)
        return total


def _recombine(recombiner: shamir.Recombiner, shares: list[shamir.Share], what: str, site: int) -> bytes:
    try:
        secret = recombiner.combine(shares)
    except shamir.ShamirError as err:
        # The message keeps shamir's wording first (callers match on it) and names the secret.
        raise SecAggError(f"{err} (shares of the {what} of site {site})") from err
    if len(secret) != _SEED_BYTES:  # self seeds and X25519 private keys are both 32 bytes
        raise SecAggError(f"the recovered {what} of site {site} has {len(secret)} bytes, expected {_SEED_BYTES}")
    return secret


# --------------------------------------------------------------------------- simulation


def run_protocol(
    inputs: Sequence[np.ndarray],
    t: int,
    drop_after_masking: Collection[int] = frozenset(),
    drop_before_unmasking: Collection[int] = frozenset(),
) -> np.ndarray:
    """Run one full round in memory over uint32 vectors and return the server's modular sum.

    The sites and the server are the real :class:`SecAggClient` and
    :class:`SecAggServer`; only the transport is a list. Drop sets hold
    indices into ``inputs``: ``drop_after_masking`` sites mask but their vector
    never arrives (their input is excluded, their mask key reconstructed);
    ``drop_before_unmasking`` sites deliver their vector but never answer the
    unmasking request (their input is included, their self seed reconstructed).
    """
    if not inputs:
        raise ValueError("no inputs")
    if not all(isinstance(i, int) and 0 <= i < len(inputs) for i in (*drop_after_masking, *drop_before_unmasking)):
        raise ValueError("drop sets must hold indices into inputs")
    config = RoundConfig(secrets.token_bytes(16), t, len(inputs[0]))
    identities = {i + 1: ed25519.Ed25519PrivateKey.generate() for i in range(len(inputs))}
    public_identities = {site: key.public_key() for site, key in identities.items()}
    clients = {site: SecAggClient(site, config, key) for site, key in identities.items()}
    server = SecAggServer(config, public_identities)

    roster = server.collect_advertisements([c.advertise() for c in clients.values()])
    routed = server.route_shares(
        [item for c in clients.values() for item in c.share_keys(roster, public_identities)]
    )
    masked = [clients[site].mask_input(inputs[site - 1], routed[site]) for site in sorted(routed)]
    survivors = server.collect_masked([m for m in masked if m.site_id - 1 not in drop_after_masking])
    responses = [clients[s].unmask(survivors) for s in survivors if s - 1 not in drop_before_unmasking]
    return server.unmask(responses)


def simulate_round(
    updates: Sequence[np.ndarray],
    t: int,
    drop_after_masking: Collection[int],
    rng: np.random.Generator,
    *,
    bound: float,
    drop_before_unmasking: Collection[int] = frozenset(),
) -> np.ndarray:
    """Securely sum float update vectors end to end: quantize, run the protocol, dequantize.

    ``rng`` drives the sites' stochastic rounding; ``bound`` is the coordinate
    range of :func:`quantize`. Raises :class:`SecAggError` when fewer than ``t``
    sites survive, without producing any partial sum.
    """
    num_sites = len(updates)
    quantized = [quantize(u, bound, num_sites, rng) for u in updates]
    total = run_protocol(quantized, t, drop_after_masking, drop_before_unmasking)
    return dequantize(total, bound, num_sites)


# --------------------------------------------------------------------------- helpers


def _verify_roster(
    advertisements: Sequence[KeyAdvertisement],
    identity_keys: Mapping[int, IdentityPublicKey],
    config: RoundConfig,
) -> dict[int, KeyAdvertisement]:
    roster: dict[int, KeyAdvertisement] = {}
    for ad in advertisements:
        _check_site_id(ad.site_id)
        if ad.site_id in roster:
            raise SecAggError(f"site {ad.site_id} advertised twice")
        if len(ad.encryption_public) != _KEY_BYTES or len(ad.mask_public) != _KEY_BYTES:
            raise SecAggError(f"site {ad.site_id} advertised malformed public keys")
        if ad.site_id not in identity_keys:
            raise SecAggError(f"no identity key known for site {ad.site_id}")
        message = _advertisement_message(config.round_id, ad.site_id, ad.encryption_public, ad.mask_public)
        _verify(identity_keys[ad.site_id], ad.signature, message, ad.site_id)
        roster[ad.site_id] = ad
    keys = [k for ad in roster.values() for k in (ad.encryption_public, ad.mask_public)]
    if len(set(keys)) != len(keys):
        raise SecAggError("advertised public keys are not all distinct")
    t, n = config.threshold, len(roster)
    if n < t:
        raise SecAggError(f"only {n} sites advertised keys, below the threshold {t}")
    if 2 * t <= n:
        raise SecAggError(f"threshold {t} is not a strict majority of the {n} sites in the round")
    return roster


def _sign(key: IdentityPrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    raise TypeError(f"identity key must be Ed25519 or EC P-256, got {type(key).__name__}")


def _verify(key: IdentityPublicKey, signature: bytes, message: bytes, site_id: int) -> None:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            raise TypeError(
                f"identity key of site {site_id} must be Ed25519 or EC P-256, got {type(key).__name__}"
            )
    except InvalidSignature as err:
        raise SecAggError(
            f"signature on site {site_id}'s advertised keys does not verify against its identity key"
        ) from err


def _advertisement_message(round_id: bytes, site_id: int, encryption_public: bytes, mask_public: bytes) -> bytes:
    header = _LABEL + b"advertise" + _frame(round_id) + site_id.to_bytes(4, "big")
    return header + encryption_public + mask_public


def _share_aad(round_id: bytes, sender: int, recipient: int) -> bytes:
    return _LABEL + b"shares" + _frame(round_id) + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


def _pairwise_seed(
    private: x25519.X25519PrivateKey, peer_public: bytes, round_id: bytes, a: int, b: int
) -> bytes:
    """The one derivation of pairwise mask seeds, shared by sites and server so they cannot diverge."""
    return _derive_pair_key(private, peer_public, b"mask", round_id, a, b)


def _derive_pair_key(
    private: x25519.X25519PrivateKey, peer_public: bytes, purpose: bytes, round_id: bytes, a: int, b: int
) -> bytes:
    """Symmetric in (a, b) so both ends of a pair derive the same key."""
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:
        raise SecAggError(f"key agreement between sites {a} and {b} failed (invalid public key)") from err
    lo, hi = sorted((a, b))
    return _hkdf(shared, purpose + _frame(round_id) + lo.to_bytes(4, "big") + hi.to_bytes(4, "big"))


def _hkdf(key_material: bytes, context: bytes) -> bytes:
    kdf = HKDF(algorithm=hashes.SHA256(), length=_SEED_BYTES, salt=None, info=_LABEL + context)
    return kdf.derive(key_material)


def _raw_public(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _unframe_pair(data: bytes) -> tuple[bytes, bytes]:
    first_len = int.from_bytes(data[:4], "big")
    first, rest = data[4 : 4 + first_len], data[4 + first_len :]
    second_len = int.from_bytes(rest[:4], "big")
    if len(first) != first_len or len(rest) != 4 + second_len:
        raise ValueError("malformed share plaintext")
    return first, rest[4:]


def _as_ring_vector(vector: np.ndarray, length: int | None) -> np.ndarray:
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.ndim != 1:
        raise ValueError("vector must be a 1-D numpy uint32 array (see quantize)")
    if length is not None and vector.size != length:
        raise ValueError(f"vector has length {vector.size}, the round expects {length}")
    return vector


def _check_site_id(site_id: int) -> None:
    if not isinstance(site_id, int) or isinstance(site_id, bool) or not 1 <= site_id < 2**32:
        raise ValueError(f"site ids must be ints in [1, 2^32), got {site_id!r}")


def verify_advertisement(advertisement: KeyAdvertisement, identity_key: IdentityPublicKey, config: RoundConfig) -> None:
    """Check one site's advertisement on arrival, so a bad one is refused alone instead of failing the roster."""
    _check_site_id(advertisement.site_id)
    if len(advertisement.encryption_public) != _KEY_BYTES or len(advertisement.mask_public) != _KEY_BYTES:
        raise SecAggError(f"site {advertisement.site_id} advertised malformed public keys")
    message = _advertisement_message(config.round_id, advertisement.site_id, advertisement.encryption_public,
                                     advertisement.mask_public)
    _verify(identity_key, advertisement.signature, message, advertisement.site_id)
