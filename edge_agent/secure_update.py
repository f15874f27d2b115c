"""One hospital's part in one secure-aggregation round: keys, sealed shares, masked update, reveal.

The agent trains as usual, then instead of sending its update it (0) advertises two fresh
X25519 keys signed with its federation identity key, (1) on the roster checks every peer's
certificate against the federation CA and its CRL and seals Shamir shares of its secrets to each peer,
(2) on receiving its peers' shares masks its fixed-point update and sends it as the round's
update blob, (3) on the survivor list reveals what the orchestrator needs to remove the masks
from the sum -- never enough to unmask a single site. The cryptography is
``shared.privacy.secagg``; the keys live in memory only, so an agent restarted mid-round has
simply dropped out (the protocol is built for that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from shared.config import AgentSettings
from shared.pki import FederationTrust, PkiError, load_identity_key
from shared.privacy.secagg import EncryptedShares, SecAggClient, SecAggError
from shared.privacy.secagg_layout import RoundSites, UnknownSite, round_config
from shared.protocol import (RoundCommand, SealedShares, SecAggAdvert, SecAggKeys, SecAggReveal, SecAggRoster,
                             SecAggShares, SecAggUnmask, UpdateReport)

M = TypeVar("M", SecAggAdvert, SecAggShares, SecAggReveal)


class SecureUpdateError(ValueError):
    """This site cannot (or will no longer) take part in the secure round; the text says why."""


@dataclass(frozen=True)
class SiteIdentity:
    """The certificate and key this site signs its round keys with, and the CA (and CRL) peers are checked against."""

    certificate_pem: str
    key: ec.EllipticCurvePrivateKey
    trust: FederationTrust

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> SiteIdentity:
        cert = settings.identity_cert or settings.tls_cert
        key = settings.identity_key or settings.tls_key
        ca = settings.identity_ca or settings.tls_ca
        if cert is None or key is None or ca is None:
            raise SecureUpdateError(
                "this round uses secure aggregation, which needs the site's federation certificate, key and CA: set "
                "FEDMQ_TLS_CERT/FEDMQ_TLS_KEY/FEDMQ_TLS_CA (or FEDMQ_IDENTITY_CERT/_KEY/_CA) to the files "
                "`fedmq pki issue-site` wrote")
        try:
            trust = FederationTrust.load(ca, settings.identity_crl)
            identity = cls(Path(cert).read_text(), load_identity_key(key), trust)
            # Our own certificate too: peers would refuse a revoked one, so better say so here.
            identity.trust.site_key(identity.certificate_pem.encode(), settings.site_id)
        except (OSError, PkiError) as e:
            raise SecureUpdateError(f"cannot use this site's identity for secure aggregation: {e}") from None
        return identity


class SecureUpdate:
    """Created once the update is trained, quantized and reported; one instance per round (keys are single-use)."""

    def __init__(self, site: str, command: RoundCommand, vector: np.ndarray, report: UpdateReport,
                 identity: SiteIdentity) -> None:
        assert command.training.secure_aggregation is not None
        self.site = site
        self.command = command
        self.round_id = command.round_id
        self.report = report  # everything but the update blob, which exists only after masking
        self.sites = RoundSites(command.selected)
        self.identity = identity
        self._vector = vector
        config = round_config(command.round_id, command.training.secure_aggregation, vector.size)
        self._client = SecAggClient(self.sites.number(site), config, identity.key)

    def _message(self, cls: type[M], **fields: object) -> M:
        return cls(federation=self.command.federation, sender=self.site, round_id=self.round_id, **fields)

    def advert(self) -> SecAggAdvert:
        ad = self._client.advertise()
        keys = SecAggKeys(site=self.site, encryption_public=ad.encryption_public, mask_public=ad.mask_public,
                          signature=ad.signature, certificate=self.identity.certificate_pem)
        return self._message(SecAggAdvert, keys=keys)

    def on_roster(self, roster: SecAggRoster) -> SecAggShares:
        """Check each peer's certificate and signature (the orchestrator must not slip in its own keys)."""
        identities = {}
        for keys in roster.keys:
            if keys.site not in self.sites:
                raise SecureUpdateError(f"the roster names {keys.site!r}, which was not selected for the round")
            try:
                identities[self.sites.number(keys.site)] = self.identity.trust.site_key(keys.certificate.encode(),
                                                                                      keys.site)
            except PkiError as e:
                raise SecureUpdateError(f"refusing the roster: {e}") from None
        ads = [self.sites.advertisement(k) for k in roster.keys]
        try:
            sealed = self._client.share_keys(ads, identities)
        except SecAggError as e:
            raise SecureUpdateError(f"refusing the roster: {e}") from None
        return self._message(SecAggShares, shares=[
            SealedShares(peer=self.sites.name(s.recipient), nonce=s.nonce, ciphertext=s.ciphertext) for s in sealed])

    def on_shares(self, msg: SecAggShares) -> bytes:
        """Open the peers' shares and return the masked vector (little-endian uint32) to send as the update."""
        try:
            received = [EncryptedShares(self.sites.number(s.peer), self.sites.number(self.site), s.nonce, s.ciphertext)
                        for s in msg.shares]
            masked = self._client.mask_input(self._vector, received)
        except (SecAggError, UnknownSite) as e:
            raise SecureUpdateError(f"cannot mask the update: {e}") from None
        return masked.vector.astype("<u4").tobytes()

    def on_unmask(self, msg: SecAggUnmask) -> SecAggReveal:
        try:
            response = self._client.unmask([self.sites.number(s) for s in msg.survivors])
        except (SecAggError, UnknownSite) as e:
            raise SecureUpdateError(f"refusing to reveal shares: {e}") from None
        return self._message(
            SecAggReveal,
            self_seed_shares={self.sites.name(n): s.to_bytes() for n, s in response.self_seed_shares.items()},
            mask_key_shares={self.sites.name(n): s.to_bytes() for n, s in response.mask_key_shares.items()})
