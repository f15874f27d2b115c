"""The federation's PKI: one private CA that every TLS identity on the broker chains to.

Why a private CA: Mosquitto authenticates clients by certificate (``require_certificate``)
and takes the certificate's CN as the MQTT username (``use_identity_as_username``), which
the ACL then uses to fence each site into its own topics. So the CN *is* the identity:
a site id for hospital agents, ``orchestrator`` and ``operator`` for the two central roles,
``monitor-<name>`` for read-only monitors (exporters, dashboards) that see fleet state only.
Revocation goes through a CRL that Mosquitto reads via ``crlfile``.

Directory layout (``init`` creates it; keys are written 0600, everything else 0644)::

    DIR/
      ca.crt  ca.key            federation root CA; its O attribute is the federation name.
                                ca.key signs everything: keep DIR off the broker host.
      crl.pem                   revoked serials, re-signed by every revoke; Mosquitto crlfile
      broker.crt broker.key     server certificate (SANs: the --broker-host names,
                                localhost, 127.0.0.1)
      orchestrator.crt .key     client certificate, CN=orchestrator
      operator.crt .key         client certificate, CN=operator (read-only monitor)
      sites/<id>.crt <id>.key   one client certificate per site, CN=<id>
      monitors/monitor-<name>.crt .key   a read-only monitor (``issue_monitor``), CN=monitor-<name>:
                                the broker ACL lets it read status, summaries and alerts only

What goes where: the broker gets ca.crt, crl.pem, broker.crt/.key; the orchestrator host
gets ca.crt, crl.pem and orchestrator.crt/.key; each hospital gets ca.crt, crl.pem and only
its own sites/<id>.crt/.key. The broker refuses revoked certificates at connect time; the
orchestrator and the hospitals check the same CRL whenever a site's certificate vouches for
its secure-aggregation keys (``FederationTrust``), so a revoked site cannot take part in a
round even through a broker that has not reread its CRL yet; and every fedmq client checks
the broker's own certificate against it (``shared.transport.client_tls_context``).

Keys are EC P-256 (small, fast, supported by every OpenSSL Mosquitto and paho link to).
Reissuing an identity (``force``) revokes the certificate it replaces, so at most one
unrevoked certificate per identity exists.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_VALIDITY_DAYS = 3650
CRL_FILE = "crl.pem"  # beside ca.crt, where `fedmq pki init` writes it
CERT_VALIDITY_DAYS = 825
ORCHESTRATOR = "orchestrator"
OPERATOR = "operator"
BROKER = "broker"
# A site named like a central role would inherit that role's ACL section.
RESERVED_NAMES = frozenset({ORCHESTRATOR, OPERATOR, BROKER})
# Monitor CNs start with this; a site id may not, or it would inherit a monitor's ACL section.
MONITOR_PREFIX = "monitor-"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_DNS_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
DNS_NAME_PATTERN = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*")
# The broker must also be reachable from its own host (health checks, tests).
LOCAL_BROKER_HOSTS = ("localhost", "127.0.0.1")
# The users the images run as (containers/*.Containerfile). A 0600 key mounted into a
# container is readable there only when it belongs to that user.
BROKER_CONTAINER_UID = 1883
FEDMQ_CONTAINER_UID = 10001


class PkiError(ValueError):
    """Bad input or PKI state; the message says what to do next."""


def validate_name(value: str, what: str, example: str = "hospital-a") -> str:
    """Refuse names that cannot be a topic level and a CN at once.

    Mosquitto's ``%u`` patterns deny usernames containing ``+``, ``#`` or ``/``, and the
    id is a topic level and a file name, so we keep it to lowercase letters, digits, ``_``
    and ``-``.
    """
    if not NAME_PATTERN.fullmatch(value):
        raise PkiError(f"invalid {what} {value!r}: use 1-63 characters of a-z, 0-9, '_' and '-', "
                       f"starting with a letter or digit (e.g. {example!r})")
    return value


def validate_site_id(site_id: str) -> str:
    """A valid site id that is not one of the central roles' names."""
    validate_name(site_id, "site id")
    if site_id in RESERVED_NAMES:
        raise PkiError(f"site id {site_id!r} is reserved for the {site_id} identity; choose another site id")
    if site_id.startswith(MONITOR_PREFIX):
        raise PkiError(f"site id {site_id!r} starts with {MONITOR_PREFIX!r}, which names read-only monitors; "
                       f"choose another site id")
    return site_id


def monitor_cn(name: str) -> str:
    """The certificate CN (and MQTT username) of monitor ``name``: ``monitor-<name>``.

    Why a prefix: the ACL needs one ``user`` section per monitor (Mosquitto has no groups),
    and the prefix keeps monitor CNs apart from site ids, which may not use it.
    """
    validate_name(name, "monitor name", "grafana")
    return validate_name(MONITOR_PREFIX + name, "monitor certificate CN (monitor-<name>, at most 63 characters)",
                         "monitor-grafana")


@dataclass(frozen=True)
class CertInfo:
    """One issued certificate as ``list`` shows it."""

    role: str
    subject: str
    serial: int
    not_after: dt.datetime
    revoked_at: dt.datetime | None


@dataclass(frozen=True)
class Issued:
    """Where a freshly issued certificate and its key were written."""

    name: str
    cert_path: Path
    key_path: Path
    certificate: x509.Certificate


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically with ``mode`` from the start, so a key is never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask and ignored for an existing file
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: Mosquitto would otherwise prompt for a passphrase at start-up.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class FederationPki:
    """A PKI directory (see the module docstring); ``init`` creates one, the constructor opens one."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not self.ca_cert_path.exists():
            raise PkiError(f"{self.root} holds no federation PKI (no ca.crt): create one with "
                           f"`fedmq pki init {self.root} --federation NAME --broker-host HOST`")
        self.ca_cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        orgs = self.ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        self.federation = str(orgs[0].value) if orgs else ""

    # -- layout ------------------------------------------------------------------------------

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.root / CRL_FILE

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    @property
    def monitors_dir(self) -> Path:
        return self.root / "monitors"

    def cert_path(self, name: str) -> Path:
        """Where the certificate of ``name`` (a site id, broker/orchestrator/operator, or a monitor CN) lives."""
        if name in RESERVED_NAMES:
            return self.root / f"{name}.crt"
        if name.startswith(MONITOR_PREFIX):
            return self.monitors_dir / f"{name}.crt"
        return self.sites_dir / f"{name}.crt"

    def key_path(self, name: str) -> Path:
        return self.cert_path(name).with_suffix(".key")

    def identity_uri(self, name: str) -> str:
        return identity_uri(self.federation, name)

    # -- creation ----------------------------------------------------------------------------

    @classmethod
    def init(cls, root: Path | str, federation: str, broker_hosts: Sequence[str] = (), *,
             force: bool = False) -> FederationPki:
        """Create the CA, CRL, broker, orchestrator and operator certificates that are missing.

        Safe to re-run: existing files are kept. A CA of another federation is an error (its
        sites' certificates would carry the wrong federation). Changed broker hosts need
        ``force``, which reissues the broker certificate (never the CA: that would invalidate
        every site's certificate).
        """
        root = Path(root)
        validate_name(federation, "federation name", "demo")
        hosts = _broker_hosts(broker_hosts)
        new_ca = not (root / "ca.crt").exists()
        if new_ca:
            if (root / "ca.key").exists():
                raise PkiError(f"{root / 'ca.key'} exists without ca.crt: restore ca.crt from a backup, "
                               f"or remove ca.key to start a new federation PKI")
            key = _new_key()
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
                              x509.NameAttribute(NameOID.COMMON_NAME, f"fedmq {federation} CA")])
            now = _now()
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            cert = (x509.CertificateBuilder()
                    .subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now - dt.timedelta(minutes=5))
                    .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                 key_encipherment=False, data_encipherment=False,
                                                 key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                 encipher_only=False, decipher_only=False), critical=True)
                    .add_extension(ski, critical=False)
                    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                                   critical=False)
                    .sign(key, hashes.SHA256()))
            _write(root / "ca.key", _key_pem(key), 0o600)
            _write(root / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        pki = cls(root)
        if pki.federation != federation:
            raise PkiError(f"{root} is the PKI of federation {pki.federation!r}, not {federation!r}: "
                           f"use another directory for a new federation")
        if new_ca:
            pki._write_crl([])
        if pki.cert_path(BROKER).exists():
            current = pki._sans(pki.load(BROKER))
            if current != set(hosts):
                if not force:
                    raise PkiError(f"the broker certificate covers {sorted(current)}, not {sorted(hosts)}: "
                                   f"pass --force to reissue it for the new hosts")
                pki._issue(BROKER, force=True, server_hosts=hosts)
        else:
            pki._issue(BROKER, force=False, server_hosts=hosts)
        for role in (ORCHESTRATOR, OPERATOR):
            if not pki.cert_path(role).exists():
                pki._issue(role, force=False)
        return pki

    def issue_site(self, site_id: str, *, force: bool = False) -> Issued:
        """Issue the site's client certificate; ``force`` replaces (and revokes) an existing one."""
        return self._issue(validate_site_id(site_id), force=force)

    def issue_monitor(self, name: str, *, force: bool = False) -> Issued:
        """Issue a read-only monitor's client certificate (CN ``monitor-<name>``).

        The broker lets it read fleet state only once its ACL names that CN: brokers started
        from this directory (``start_tls_mosquitto``) do; a deployed broker's ACL is written
        by ``python -m shared.broker_acl OUT_DIR --monitor NAME`` (then SIGHUP the broker).
        """
        return self._issue(monitor_cn(name), force=force)

    def _issue(self, name: str, *, force: bool, server_hosts: Sequence[str] = ()) -> Issued:
        cert_path, key_path = self.cert_path(name), self.key_path(name)
        if cert_path.exists():
            old = self.load(name)
            revoked = self.revoked().get(old.serial_number)
            if not force:
                state = (f"revoked on {revoked:%Y-%m-%d}" if revoked
                         else f"valid until {old.not_valid_after_utc:%Y-%m-%d}")
                raise PkiError(f"{name} already has a certificate (serial {old.serial_number:x}, {state}) at "
                               f"{cert_path}: pass --force to issue a new one (the old one gets revoked)")
            if revoked is None:
                self._revoke_serials([old.serial_number])
        ca_key = self._ca_key()
        key = _new_key()
        now = _now()
        server = name == BROKER
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.federation),
                                            x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(min(now + dt.timedelta(days=CERT_VALIDITY_DAYS),
                                        self.ca_cert.not_valid_after_utc))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(self._aki(), critical=False))
        # Mosquitto reads the CN; the SAN is for verifiers that, per RFC 6125, ignore CNs.
        sans = _general_names(server_hosts) if server else [x509.UniformResourceIdentifier(self.identity_uri(name))]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return Issued(name, cert_path, key_path, cert)

    # -- revocation --------------------------------------------------------------------------

    def revoke(self, name: str) -> x509.Certificate:
        """Revoke the current certificate of a site (or of the orchestrator/operator).

        The CRL file is rewritten in place; Mosquitto reads it at start-up and on SIGHUP, so
        the broker must be signalled (``docker kill -s HUP mosquitto``) or restarted. Copies
        beside ca.crt at the orchestrator and the hospitals count from their next check.
        """
        if name not in (ORCHESTRATOR, OPERATOR) and not name.startswith(MONITOR_PREFIX):
            validate_site_id(name)
        validate_name(name, "identity")
        if not self.cert_path(name).exists():
            raise PkiError(f"no certificate for {name!r} in {self.root}: `fedmq pki list {self.root}` "
                           f"shows the issued ones")
        cert = self.load(name)
        when = self.revoked().get(cert.serial_number)
        if when is not None:
            raise PkiError(f"the certificate of {name!r} (serial {cert.serial_number:x}) was already "
                           f"revoked on {when:%Y-%m-%d %H:%M} UTC; nothing to do")
        self._revoke_serials([cert.serial_number])
        return cert

    # -- containers --------------------------------------------------------------------------

    def give_keys_to_containers(self, names: Iterable[str] | None = None) -> dict[Path, int]:
        """Hand keys to the users the images run as: broker.key to 1883, the others to 10001.

        Why: the containers run unprivileged and the keys stay 0600, so a key written by
        root (or by the operator's own user) cannot be read in a container until it belongs
        to the container's user. ``names`` defaults to the broker, the orchestrator and every
        site; the operator's key and ca.key never go into a container and are left alone.
        Returns each key with its new owner.
        """
        targets = list(names) if names is not None else [BROKER, ORCHESTRATOR, *self.site_ids()]
        owners = {self.key_path(n): BROKER_CONTAINER_UID if n == BROKER else FEDMQ_CONTAINER_UID
                  for n in targets}
        for path, uid in owners.items():
            try:
                os.chown(path, uid, uid)
            except FileNotFoundError:
                raise PkiError(f"{path} does not exist: issue that identity first") from None
            except PermissionError:
                raise PkiError(f"cannot give {path} to uid {uid}: changing owners needs root, so rerun with "
                               f"sudo; for rootless Podman run the command under `podman unshare`") from None
        return owners

    def revoked(self) -> dict[int, dt.datetime]:
        """Revoked serial numbers and when they were revoked, from the CRL."""
        crl = self.load_crl()
        return {r.serial_number: r.revocation_date_utc for r in crl}

    def load_crl(self) -> x509.CertificateRevocationList:
        if not self.crl_path.exists():
            raise PkiError(f"{self.crl_path} is missing: restore it from a backup (an empty CRL would "
                           f"silently un-revoke every revoked certificate)")
        return x509.load_pem_x509_crl(self.crl_path.read_bytes())

    def _revoke_serials(self, serials: Iterable[int]) -> None:
        now = _now()
        entries = [(r.serial_number, r.revocation_date_utc) for r in self.load_crl()]
        entries += [(s, now) for s in serials]
        self._write_crl(entries)

    def _write_crl(self, entries: Sequence[tuple[int, dt.datetime]]) -> None:
        """Sign a CRL valid until the CA expires.

        Why so long: OpenSSL rejects *every* client once the CRL's nextUpdate passes, and
        this CRL is not fetched by anyone but handed to our own broker, so a short
        nextUpdate would only add an outage whenever nobody re-signed it in time.
        """
        number = 1
        if self.crl_path.exists():
            ext = self.load_crl().extensions.get_extension_for_class(x509.CRLNumber)
            number = ext.value.crl_number + 1
        now = _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(self.ca_cert.not_valid_after_utc)
                   .add_extension(x509.CRLNumber(number), critical=False)
                   .add_extension(self._aki(), critical=False))
        for serial, when in entries:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        crl = builder.sign(self._ca_key(), hashes.SHA256())
        _write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)

    # -- reading -----------------------------------------------------------------------------

    def load(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path(name).read_bytes())

    def site_ids(self) -> list[str]:
        return sorted(p.stem for p in self.sites_dir.glob("*.crt")) if self.sites_dir.is_dir() else []

    def monitor_cns(self) -> list[str]:
        """CNs of the monitors issued here (revoked ones included: the CRL keeps those out)."""
        return sorted(p.stem for p in self.monitors_dir.glob("*.crt")) if self.monitors_dir.is_dir() else []

    def certificates(self) -> list[CertInfo]:
        """Every certificate in the directory: CA, broker, orchestrator, operator, sites, then monitors."""
        revoked = self.revoked()
        named: list[tuple[str, Path]] = [("ca", self.ca_cert_path)]
        named += [(role, self.cert_path(role)) for role in (BROKER, ORCHESTRATOR, OPERATOR)]
        named += [("site", self.cert_path(site)) for site in self.site_ids()]
        named += [("monitor", self.cert_path(cn)) for cn in self.monitor_cns()]
        infos = []
        for role, path in named:
            if not path.exists():
                continue
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            infos.append(CertInfo(role, cert.subject.rfc4514_string(), cert.serial_number,
                                  cert.not_valid_after_utc, revoked.get(cert.serial_number)))
        return infos

    def _ca_key(self) -> ec.EllipticCurvePrivateKey:
        if not self.ca_key_path.exists():
            raise PkiError(f"{self.ca_key_path} is missing: signing needs the CA key; run this on the "
                           f"machine that holds the federation's CA")
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.ca_key_path} is not an EC private key")
        return key

    def _aki(self) -> x509.AuthorityKeyIdentifier:
        ski = self.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    @staticmethod
    def _sans(cert: x509.Certificate) -> set[str]:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n.value) for n in san}


def identity_uri(federation: str, name: str) -> str:
    """The URI SAN of a client certificate: names the federation as well as the identity."""
    return f"urn:fedmq:{federation}:{name}"


def _broker_hosts(hosts: Iterable[str]) -> list[str]:
    """The requested broker names plus the local ones, normalised and deduplicated, order kept."""
    result: list[str] = []
    for raw in [*hosts, *LOCAL_BROKER_HOSTS]:
        host = raw.strip().lower()
        if _is_ip(host):
            host = str(ipaddress.ip_address(host))
        elif not DNS_NAME_PATTERN.fullmatch(host):
            raise PkiError(f"invalid broker host {raw!r}: give a DNS name or an IP address, "
                           f"without scheme or port (e.g. --broker-host mqtt.example.org)")
        if host not in result:
            result.append(host)
    return result


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _general_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    return [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]


# -- site identities for secure aggregation ---------------------------------------------------

def load_ca_certificate(path: Path) -> x509.Certificate:
    """The federation CA certificate that site identities must chain to."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise PkiError(f"cannot read the federation CA certificate {path}: {e}; point the setting at the "
                       f"ca.crt that `fedmq pki init` created") from None


def crl_beside(ca_path: Path) -> Path | None:
    """The crl.pem next to a ca.crt, where `fedmq pki` writes it and where it is handed out with it; None if absent."""
    beside = Path(ca_path).parent / CRL_FILE
    return beside if beside.is_file() else None


def load_verified_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """The federation CRL at ``path``, refused unless the CA signed it and it has not expired.

    Why so strict: a CRL anyone could write would let them un-revoke a certificate (or revoke
    an honest site), and an expired one no longer says which certificates are revoked now.
    """
    try:
        crl = x509.load_pem_x509_crl(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise PkiError(f"cannot read the federation CRL {path}: {e}; copy the {CRL_FILE} that `fedmq pki` keeps "
                       f"beside ca.crt") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise PkiError(f"the CRL {path} is not signed by the federation CA ({ca_cert.subject.rfc4514_string()}): "
                       f"replace it with the {CRL_FILE} that `fedmq pki` wrote beside this federation's ca.crt")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < _now():
        raise PkiError(f"the CRL {path} expired on {next_update:%Y-%m-%d %H:%M} UTC: re-sign it on the CA machine "
                       f"(every `fedmq pki revoke` or `fedmq pki issue-site --force` writes a fresh {CRL_FILE}) "
                       f"and copy it here")
    return crl


class FederationTrust:
    """What a site's certificate is checked against: the federation CA and, when there is one, its CRL.

    The CRL file is reread whenever it changes, so ``fedmq pki revoke`` plus a copy of
    ``crl.pem`` takes effect at the next check without a restart. A CRL that became unreadable,
    foreign or expired fails every check (closed, never open), with an error saying why.
    """

    def __init__(self, ca_cert: x509.Certificate, crl_path: Path | None = None) -> None:
        self.ca_cert = ca_cert
        self.crl_path = crl_path
        self._crl: tuple[tuple[int, int], x509.CertificateRevocationList] | None = None

    @classmethod
    def load(cls, ca_path: Path, crl_path: Path | None = None) -> FederationTrust:
        """The CA at ``ca_path`` and the CRL at ``crl_path`` (default: crl.pem beside the CA, if present).

        A CRL named explicitly must exist; the default one is optional because hospitals and
        orchestrators set up before the CRL check existed were handed ca.crt alone. Without a
        CRL only the broker refuses revoked certificates, which a warning says.
        """
        ca_cert = load_ca_certificate(ca_path)
        crl_path = crl_path or crl_beside(ca_path)
        if crl_path is None:
            log.warning("no %s beside %s: revoked site certificates are refused only by the broker; copy the "
                        "federation's %s there (or name it in the identity_crl setting)", CRL_FILE, ca_path, CRL_FILE)
            return cls(ca_cert)
        trust = cls(ca_cert, Path(crl_path))
        trust.revoked_on(0)  # a missing, foreign or expired CRL is reported at start-up, not at the first round
        return trust

    def revoked_on(self, serial: int) -> dt.datetime | None:
        """When the CRL revoked the certificate with this serial; None if it did not (or there is no CRL)."""
        if self.crl_path is None:
            return None
        try:
            stat = self.crl_path.stat()
        except OSError as e:
            raise PkiError(f"cannot read the federation CRL {self.crl_path}: {e}; copy the {CRL_FILE} that "
                           f"`fedmq pki` keeps beside ca.crt") from None
        key = (stat.st_mtime_ns, stat.st_size)
        if self._crl is None or self._crl[0] != key:
            self._crl = (key, load_verified_crl(self.crl_path, self.ca_cert))
        entry = self._crl[1].get_revoked_certificate_by_serial_number(serial)
        return entry.revocation_date_utc if entry is not None else None

    def site_key(self, certificate_pem: bytes, site_id: str) -> ec.EllipticCurvePublicKey:
        """The public key a site signs with, from a certificate that must be the federation's for that site.

        Secure aggregation's key advertisements travel through the orchestrator, which must not be
        able to substitute its own keys: each one is signed by the site's identity key, and only a
        certificate issued by the federation CA (valid now, not revoked, for client use, CN and URI
        naming this site of this federation) vouches for that key.
        """
        from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

        try:
            cert = x509.load_pem_x509_certificate(certificate_pem)
        except ValueError as e:
            raise PkiError(f"site {site_id} sent a certificate that is not PEM X.509: {e}") from None
        try:
            PolicyBuilder().store(Store([self.ca_cert])).build_client_verifier().verify(cert, [])
        except VerificationError as e:
            raise PkiError(f"the certificate presented for site {site_id} does not chain to the federation CA "
                           f"({e}); issue one with `fedmq pki issue-site {site_id}`") from None
        revoked = self.revoked_on(cert.serial_number)
        if revoked is not None:
            raise PkiError(f"the certificate presented for site {site_id} (serial {cert.serial_number:x}) was revoked "
                           f"on {revoked:%Y-%m-%d %H:%M} UTC ({self.crl_path}): that site takes no part; if it should, "
                           f"issue it a new certificate with `fedmq pki issue-site DIR {site_id} --force`")
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [site_id]:
            raise PkiError(f"the certificate presented for site {site_id} names {names}, not that site")
        orgs = self.ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        federation = str(orgs[0].value) if orgs else ""
        if identity_uri(federation, site_id) not in FederationPki._sans(cert):
            raise PkiError(f"the certificate presented for site {site_id} is not for federation {federation!r}")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise PkiError(f"the certificate of site {site_id} holds a {type(key).__name__}, not an EC key")
        return key


def load_identity_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A site's own private key (the one `fedmq pki issue-site` wrote), to sign with."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise PkiError(f"cannot read the site's identity key {path}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC private key")
    return key
