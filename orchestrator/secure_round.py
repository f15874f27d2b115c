"""The orchestrator's side of one secure-aggregation round, phase by phase, over MQTT.

A train round with ``training.secure_aggregation`` does not end when updates arrive: the
sites' masked vectors are useless alone, and the orchestrator must learn only their sum.
Phases (each ends when every expected site answered, or at its deadline with at least the
threshold ``t``; below ``t`` the round fails cleanly and nothing is revealed):

``advertise``  sites train, then send signed X25519 keys plus the certificate vouching for
               them; ends at the round's deadline -> roster U1 broadcast on ``orch/all/secagg``
``share``      sites send Shamir shares sealed to each peer -> relayed per recipient on
               ``orch/to/{site}/secagg`` (the senders form U2)
``mask``       sites send their masked fixed-point vector as the round's update blob
               (``UpdateReport``; stored and acknowledged like any update) -> survivors U3
               broadcast
``unmask``     survivors reveal shares of U3's self-mask seeds and of the dropped sites'
               mask keys -> the sum, dequantized and divided by the summed weight

The cryptography is ``shared.privacy.secagg``; this module is the plumbing: message
validation (each bad message is refused alone, with a log line, instead of failing the
roster), phase deadlines and the translation between site names and round-local numbers.
Its state lives in memory only: a restarted orchestrator fails the open attempt and the
round is retried with fresh keys (see ``RoundEngine.start``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from shared.pki import FederationTrust, PkiError
from shared.privacy import shamir
from shared.privacy.secagg import (EncryptedShares, IdentityPublicKey, MaskedInput, SecAggError, SecAggServer,
                                   UnmaskingResponse, dequantize, verify_advertisement)
from shared.privacy.secagg_layout import RoundSites, UnknownSite, UpdateLayout, round_config
from shared.protocol import (Message, RoundCommand, SealedShares, SecAggAdvert, SecAggKeys, SecAggReveal,
                             SecAggRoster, SecAggShares, SecAggUnmask)

log = logging.getLogger(__name__)

SENDER = "orchestrator"

Phase = Literal["advertise", "share", "mask", "unmask", "done", "failed"]


class SecureRoundError(ValueError):
    """A site's secure-aggregation message that cannot be used; the round goes on without it."""


class SecAggPublisher(Protocol):
    def secagg_broadcast(self, message: Message) -> None: ...
    def secagg_to_site(self, site: str, message: Message) -> None: ...


@dataclass(frozen=True)
class SecureSum:
    """What the orchestrator learns: the weighted mean update of the survivors, and who they are."""

    mean: dict[str, np.ndarray]
    weight: float
    contributors: list[str]


class SecureRound:
    def __init__(self, command: RoundCommand, layout: UpdateLayout, trust: FederationTrust,
                 clock: Callable[[], float]) -> None:
        settings = command.training.secure_aggregation
        assert settings is not None
        self.settings = settings
        self.command = command
        self.layout = layout
        self.sites = RoundSites(command.selected)
        self.config = round_config(command.round_id, settings, layout.vector_length)
        self.trust = trust
        self.clock = clock
        self.phase: Phase = "advertise"
        self.deadline = command.deadline
        self.failure: str | None = None
        self.result: SecureSum | None = None
        self._server: SecAggServer | None = None
        self._adverts: dict[str, SecAggKeys] = {}
        self._identities: dict[int, IdentityPublicKey] = {}
        self._shares: dict[str, list[EncryptedShares]] = {}
        self._u2: list[str] = []
        self._masked: dict[str, np.ndarray] = {}
        self._survivors: list[str] = []
        self._reveals: dict[str, UnmaskingResponse] = {}

    # inputs -----------------------------------------------------------------------------------
    def on_advert(self, site: str, msg: SecAggAdvert) -> None:
        self._expect("advertise", site, "keys")
        if msg.keys.site != site:
            raise SecureRoundError(f"keys name site {msg.keys.site!r} but came from {site!r}")
        if site in self._adverts:
            raise SecureRoundError(f"{site} already advertised keys for this round")
        try:
            identity = self.trust.site_key(msg.keys.certificate.encode(), site)
            verify_advertisement(self.sites.advertisement(msg.keys), identity, self.config)
        except (PkiError, SecAggError, ValueError) as e:
            raise SecureRoundError(str(e)) from None
        self._adverts[site] = msg.keys
        self._identities[self.sites.number(site)] = identity

    def on_shares(self, site: str, msg: SecAggShares) -> None:
        self._expect("share", site, "shares")
        if site not in self._adverts:
            raise SecureRoundError(f"{site} sent shares but is not in the round's roster")
        if site in self._shares:
            raise SecureRoundError(f"{site} already sent its shares")
        peers = sorted(s.peer for s in msg.shares)
        if peers != sorted(set(self._adverts) - {site}):
            raise SecureRoundError(f"{site} must send one share set to each other site of the roster, "
                                   f"sent to {peers}")
        self._shares[site] = [EncryptedShares(self.sites.number(site), self.sites.number(s.peer), s.nonce, s.ciphertext)
                              for s in msg.shares]

    def accept_masked(self, site: str, data: bytes) -> None:
        """A masked vector (the round's update blob); it must be the agreed length of uint32 values."""
        self._expect("mask", site, "a masked update")
        if site not in self._u2:
            raise SecureRoundError(f"{site} did not share keys in this round, so its masked update cannot be "
                                   "unmasked")
        if site in self._masked:
            raise SecureRoundError(f"{site} already sent its masked update")
        expected = 4 * self.layout.vector_length
        if len(data) != expected:
            raise SecureRoundError(f"masked update has {len(data)} bytes, the round needs {expected} "
                                   f"({self.layout.vector_length} uint32 values)")
        self._masked[site] = np.frombuffer(data, dtype="<u4").astype(np.uint32)

    def on_reveal(self, site: str, msg: SecAggReveal) -> None:
        self._expect("unmask", site, "unmasking shares")
        if site not in self._survivors:
            raise SecureRoundError(f"{site} is not among the survivors {self._survivors}")
        if site in self._reveals:
            raise SecureRoundError(f"{site} already revealed its shares")
        try:
            response = UnmaskingResponse(
                self.sites.number(site),
                {self.sites.number(s): shamir.Share.from_bytes(b) for s, b in msg.self_seed_shares.items()},
                {self.sites.number(s): shamir.Share.from_bytes(b) for s, b in msg.mask_key_shares.items()})
        except (shamir.ShamirError, UnknownSite) as e:
            raise SecureRoundError(f"unusable shares from {site}: {e}") from None
        self._reveals[site] = response

    # progress ----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.phase in ("done", "failed")

    @property
    def waiting_for(self) -> list[str]:
        """Sites the current phase still waits for (operators see them in the status detail)."""
        expected = {"advertise": self.command.selected, "share": list(self._adverts), "mask": self._u2,
                    "unmask": self._survivors}.get(self.phase, [])
        have = {"advertise": self._adverts, "share": self._shares, "mask": self._masked,
                "unmask": self._reveals}.get(self.phase, {})
        return [s for s in expected if s not in have]

    def advance(self, publisher: SecAggPublisher, quorum: int, failed: Collection[str] = ()) -> None:
        """Move to the next phase when the current one is complete or past its deadline.

        ``failed`` are sites that reported an error for this round: they will not answer, so the
        phase does not wait for them.
        """
        if self.finished or (set(self.waiting_for) - set(failed) and self.clock() < self.deadline):
            return
        try:
            step = {"advertise": self._close_advertise, "share": self._close_share, "mask": self._close_mask,
                    "unmask": self._close_unmask}[self.phase]
            step(publisher, quorum)
        except (SecAggError, shamir.ShamirError, ValueError) as e:
            self.failure = f"secure aggregation failed in phase {self.phase!r}: {e}"
            self.phase = "failed"
            return
        if self.phase not in ("done", "failed"):
            self.deadline = self.clock() + self.settings.phase_timeout

    def _close_advertise(self, publisher: SecAggPublisher, quorum: int) -> None:
        missing = self.waiting_for
        if missing:
            log.warning("secure round %s: no keys from %s by the deadline", self.command.round_id, missing)
        self._server = SecAggServer(self.config, self._identities)
        self._server.collect_advertisements([self.sites.advertisement(k) for k in self._adverts.values()])
        roster = [self._adverts[s] for s in self.command.selected if s in self._adverts]
        publisher.secagg_broadcast(SecAggRoster(federation=self.command.federation, sender=SENDER,
                                                round_id=self.command.round_id, keys=roster))
        self.phase = "share"

    def _close_share(self, publisher: SecAggPublisher, quorum: int) -> None:
        assert self._server is not None
        routed = self._server.route_shares([s for shares in self._shares.values() for s in shares])
        self._u2 = [self.sites.name(n) for n in sorted(routed)]
        for number, items in routed.items():
            msg = SecAggShares(federation=self.command.federation, sender=SENDER, round_id=self.command.round_id,
                               shares=[SealedShares(peer=self.sites.name(i.sender), nonce=i.nonce,
                                                    ciphertext=i.ciphertext) for i in items])
            publisher.secagg_to_site(self.sites.name(number), msg)
        self.phase = "mask"

    def _close_mask(self, publisher: SecAggPublisher, quorum: int) -> None:
        assert self._server is not None
        if len(self._masked) < quorum:
            raise SecAggError(f"only {len(self._masked)} masked updates arrived, the round's quorum is {quorum}; "
                              "nothing was revealed")
        survivors = self._server.collect_masked(
            [MaskedInput(self.sites.number(s), v) for s, v in self._masked.items()])
        self._survivors = [self.sites.name(n) for n in survivors]
        publisher.secagg_broadcast(SecAggUnmask(federation=self.command.federation, sender=SENDER,
                                                round_id=self.command.round_id, survivors=self._survivors))
        self.phase = "unmask"

    def _close_unmask(self, publisher: SecAggPublisher, quorum: int) -> None:
        assert self._server is not None
        total = self._server.unmask(list(self._reveals.values()))
        values = dequantize(total, self.settings.bound, len(self.command.selected))
        mean, weight = self.layout.unpack(values)
        self.result = SecureSum(mean, weight, list(self._survivors))
        self.phase = "done"

    # helpers ------------------------------------------------------------------------------------
    def _expect(self, phase: Phase, site: str, what: str) -> None:
        if site not in self.sites:
            raise SecureRoundError(f"{site} was not selected for round {self.command.round_id}")
        if self.phase != phase:
            raise SecureRoundError(f"{what} from {site} arrived in phase {self.phase!r}, expected in {phase!r} "
                                   "(too late: the round went on without this site)")
