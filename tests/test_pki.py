"""The federation PKI: certificates chain to the CA with the right identities and uses,
revocation lands in the CA-signed CRL, keys stay private, and mistakes get clear errors."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from fedmq.pki_cli import app
from shared.pki import FederationPki, FederationTrust, PkiError


@pytest.fixture()
def pki(tmp_path: Path) -> FederationPki:
    return FederationPki.init(tmp_path / "pki", "demo", ["mqtt.example.org", "10.1.2.3"])


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_layout_and_file_modes(pki: FederationPki) -> None:
    pki.issue_site("hospital-a")
    root = pki.root
    keys = ["ca.key", "broker.key", "orchestrator.key", "operator.key", "sites/hospital-a.key"]
    public = ["ca.crt", "crl.pem", "broker.crt", "orchestrator.crt", "operator.crt", "sites/hospital-a.crt"]
    for name in keys:
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
    for name in public:
        assert stat.S_IMODE((root / name).stat().st_mode) == 0o644, name
    assert not list(root.rglob(".*.tmp"))


def test_broker_certificate_verifies_for_every_broker_name(pki: FederationPki) -> None:
    store = Store([pki.ca_cert])
    broker = pki.load("broker")
    for name in ("mqtt.example.org", "localhost"):
        chain = PolicyBuilder().store(store).build_server_verifier(DNSName(name)).verify(broker, [])
        assert chain[-1] == pki.ca_cert
    for ip in ("127.0.0.1", "10.1.2.3"):
        PolicyBuilder().store(store).build_server_verifier(IPAddress(ipaddress.ip_address(ip))).verify(broker, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(DNSName("evil.example.org")).verify(broker, [])


def test_client_certificates_chain_to_the_ca_with_their_identity(pki: FederationPki) -> None:
    site = pki.issue_site("hospital-a").certificate
    verifier = PolicyBuilder().store(Store([pki.ca_cert])).build_client_verifier()
    for name, cert in [("hospital-a", site), ("orchestrator", pki.load("orchestrator")),
                       ("operator", pki.load("operator"))]:
        verified = verifier.verify(cert, [])
        assert _cn(cert) == name  # Mosquitto's use_identity_as_username reads the CN
        assert verified.subjects == [x509.UniformResourceIdentifier(f"urn:fedmq:demo:{name}")]
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "demo"
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    # The broker's serverAuth-only certificate must not work as a client identity.
    with pytest.raises(VerificationError, match="EKU"):
        verifier.verify(pki.load("broker"), [])


def test_a_certificate_from_another_federation_does_not_verify(pki: FederationPki, tmp_path: Path) -> None:
    other = FederationPki.init(tmp_path / "other", "other")
    intruder = other.issue_site("hospital-a").certificate
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([pki.ca_cert])).build_client_verifier().verify(intruder, [])


def test_revocation_goes_into_the_ca_signed_crl(pki: FederationPki) -> None:
    cert = pki.issue_site("hospital-a").certificate
    pki.issue_site("hospital-b")
    number_before = pki.load_crl().extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    pki.revoke("hospital-a")
    crl = pki.load_crl()
    ca_key = pki.ca_cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(pki.load("hospital-b").serial_number) is None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number_before + 1
    assert crl.next_update_utc is not None and crl.next_update_utc >= pki.ca_cert.not_valid_after_utc
    with pytest.raises(PkiError, match="already revoked"):
        pki.revoke("hospital-a")
    with pytest.raises(PkiError, match="no certificate for 'hospital-z'"):
        pki.revoke("hospital-z")


def test_issuing_twice_needs_force_which_revokes_the_old_certificate(pki: FederationPki) -> None:
    first = pki.issue_site("hospital-a").certificate
    with pytest.raises(PkiError, match="already has a certificate.*--force"):
        pki.issue_site("hospital-a")
    second = pki.issue_site("hospital-a", force=True).certificate
    assert second.serial_number != first.serial_number
    assert set(pki.revoked()) == {first.serial_number}
    assert pki.load("hospital-a") == second


def test_init_is_idempotent_and_guards_the_ca(pki: FederationPki) -> None:
    broker, ca = pki.load("broker"), pki.ca_cert
    again = FederationPki.init(pki.root, "demo", ["mqtt.example.org", "10.1.2.3"])
    assert (again.load("broker"), again.ca_cert) == (broker, ca)
    with pytest.raises(PkiError, match="federation 'demo', not 'other'"):
        FederationPki.init(pki.root, "other", ["mqtt.example.org"])
    with pytest.raises(PkiError, match="pass --force"):
        FederationPki.init(pki.root, "demo", ["new.example.org"])
    moved = FederationPki.init(pki.root, "demo", ["new.example.org"], force=True)
    assert moved.ca_cert == ca
    sans = moved.load("broker").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in sans} == {"new.example.org", "localhost", "127.0.0.1"}
    assert broker.serial_number in moved.revoked()


@pytest.mark.parametrize("site_id", ["Hospital-A", "a/b", "a+b", "a#", "", "-a", "a" * 64, "a b",
                                     "orchestrator", "operator", "broker"])
def test_bad_site_ids_are_refused(pki: FederationPki, site_id: str) -> None:
    with pytest.raises(PkiError, match="site id"):
        pki.issue_site(site_id)
    assert not pki.sites_dir.exists() or not list(pki.sites_dir.iterdir())


def test_bad_broker_hosts_and_missing_files_are_explained(tmp_path: Path, pki: FederationPki) -> None:
    with pytest.raises(PkiError, match="without scheme or port"):
        FederationPki.init(tmp_path / "x", "demo", ["mqtts://broker:8883"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(PkiError, match="fedmq pki init"):
        FederationPki(tmp_path / "nowhere")
    pki.crl_path.unlink()
    with pytest.raises(PkiError, match="restore it from a backup"):
        pki.revoke("orchestrator")


def test_cli_round_trip(tmp_path: Path) -> None:
    runner = CliRunner()
    root = str(tmp_path / "pki")
    result = runner.invoke(app, ["init", root, "--federation", "demo", "--broker-host", "mqtt.example.org"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["issue-site", root, "hospital-a"]).exit_code == 0
    assert runner.invoke(app, ["issue-site", root, "hospital-b"]).exit_code == 0

    twice = runner.invoke(app, ["issue-site", root, "hospital-a"])
    assert twice.exit_code == 1 and "--force" in twice.output and "Traceback" not in twice.output

    assert runner.invoke(app, ["revoke", root, "hospital-b"]).exit_code == 0
    listing = runner.invoke(app, ["list", root], env={"COLUMNS": "250"})
    assert listing.exit_code == 0, listing.output
    pki = FederationPki(root)
    lines = {line.split("│")[1].strip() + "/" + line.split("│")[2].strip(): line
             for line in listing.output.splitlines() if line.count("│") >= 5}
    assert set(lines) == {"ca/CN=fedmq demo CA,O=demo", "broker/CN=broker,O=demo",
                          "orchestrator/CN=orchestrator,O=demo", "operator/CN=operator,O=demo",
                          "site/CN=hospital-a,O=demo", "site/CN=hospital-b,O=demo"}
    assert f"{pki.load('hospital-b').serial_number:x}" in lines["site/CN=hospital-b,O=demo"]
    assert lines["site/CN=hospital-a,O=demo"].rstrip(" │").endswith("no")
    assert not lines["site/CN=hospital-b,O=demo"].rstrip(" │").endswith("no")

    bad = runner.invoke(app, ["init", str(tmp_path / "x"), "--federation", "Bad Name"])
    assert bad.exit_code == 1 and "invalid federation name" in bad.output


def test_identities_are_checked_against_the_crl_beside_the_ca_and_its_updates(pki: FederationPki) -> None:
    pki.issue_site("hospital-a")
    pki.issue_site("hospital-b")
    trust = FederationTrust.load(pki.ca_cert_path)  # crl.pem beside ca.crt, by default
    assert trust.crl_path == pki.crl_path
    pem_a, pem_b = pki.cert_path("hospital-a").read_bytes(), pki.cert_path("hospital-b").read_bytes()
    assert isinstance(trust.site_key(pem_a, "hospital-a"), ec.EllipticCurvePublicKey)
    pki.revoke("hospital-a")  # read at the next check: no restart needed
    with pytest.raises(PkiError, match="was revoked on .*issue-site DIR hospital-a --force"):
        trust.site_key(pem_a, "hospital-a")
    trust.site_key(pem_b, "hospital-b")
    # Reissued: the new certificate is good, the old one stays revoked.
    pki.issue_site("hospital-b", force=True)
    with pytest.raises(PkiError, match="revoked"):
        trust.site_key(pem_b, "hospital-b")
    trust.site_key(pki.cert_path("hospital-b").read_bytes(), "hospital-b")


def test_a_crl_that_is_not_the_cas_or_expired_is_refused(tmp_path: Path, pki: FederationPki) -> None:
    pki.issue_site("hospital-a")
    pem = pki.cert_path("hospital-a").read_bytes()
    # Another CA with the very same name (federation "demo"): only the signature tells them apart.
    other = FederationPki.init(tmp_path / "other", "demo")
    with pytest.raises(PkiError, match="not signed by the federation CA"):
        FederationTrust.load(pki.ca_cert_path, other.crl_path)
    with pytest.raises(PkiError, match="cannot read the federation CRL .*missing.pem"):
        FederationTrust.load(pki.ca_cert_path, tmp_path / "missing.pem")

    ca_key = serialization.load_pem_private_key(pki.ca_key_path.read_bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    expired = (x509.CertificateRevocationListBuilder().issuer_name(pki.ca_cert.subject)
               .last_update(now - dt.timedelta(days=10)).next_update(now - dt.timedelta(days=1))
               .sign(ca_key, hashes.SHA256()))
    stale = tmp_path / "stale.pem"
    stale.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="expired on .*copy it here"):
        FederationTrust.load(pki.ca_cert_path, stale)

    # A running check fails closed when its CRL is swapped for a foreign one or vanishes.
    trust = FederationTrust.load(pki.ca_cert_path)
    trust.site_key(pem, "hospital-a")
    shutil.copy(other.crl_path, pki.crl_path)
    with pytest.raises(PkiError, match="not signed by the federation CA"):
        trust.site_key(pem, "hospital-a")
    pki.crl_path.unlink()
    with pytest.raises(PkiError, match="cannot read the federation CRL"):
        trust.site_key(pem, "hospital-a")


def test_without_a_crl_beside_the_ca_only_the_broker_refuses_revoked_certificates(
        tmp_path: Path, pki: FederationPki, caplog: pytest.LogCaptureFixture) -> None:
    pki.issue_site("hospital-a")
    pki.revoke("hospital-a")
    alone = tmp_path / "hospital" / "ca.crt"  # a hospital handed ca.crt without crl.pem
    alone.parent.mkdir()
    shutil.copy(pki.ca_cert_path, alone)
    with caplog.at_level(logging.WARNING, logger="shared.pki"):
        trust = FederationTrust.load(alone)
    assert trust.crl_path is None
    assert "refused only by the broker" in caplog.text
    trust.site_key(pki.cert_path("hospital-a").read_bytes(), "hospital-a")  # the limitation the warning names
