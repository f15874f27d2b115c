"""``fedmq pki``: the federation's certificates, from the command line.

Why a CLI of its own: the person who runs the CA (usually the federation's coordinator)
is not the one who runs the broker or a hospital's agent, and only this step needs the
CA key. The commands wrap shared.pki and turn its errors into one readable line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from shared.broker_acl import CONTAINER_MONITORS
from shared.pki import BROKER, ORCHESTRATOR, FederationPki, Issued, PkiError

app = typer.Typer(help="Federation PKI: CA, broker, orchestrator, operator, per-site and monitor certificates.",
                  no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

T = TypeVar("T")
DirArg = Annotated[Path, typer.Argument(help="PKI directory (see `fedmq pki init --help`).")]
ContainerOwnersOption = Annotated[bool, typer.Option(
    "--container-owners", help="Give the keys to the users the fedmq images run as (broker.key: uid 1883, "
                               "orchestrator and site keys: uid 10001), so the containers can read them. "
                               "Needs root.")]


def _run(action: Callable[[], T]) -> T:
    """Run a PKI action; a PkiError becomes a one-line message and exit code 1, not a traceback."""
    try:
        return action()
    except PkiError as e:
        err_console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None


def _give_keys(pki: FederationPki, names: list[str]) -> None:
    for path, uid in _run(lambda: pki.give_keys_to_containers(names)).items():
        console.print(f"{path} now belongs to uid {uid} (the container user that reads it)")


@app.command()
def init(
    directory: DirArg,
    federation: Annotated[str, typer.Option(help="Federation name: the {federation} level of the topics.")],
    broker_host: Annotated[list[str] | None, typer.Option(
        "--broker-host", help="DNS name or IP the agents use to reach the broker (repeatable); "
                              "localhost and 127.0.0.1 are always added.")] = None,
    force: Annotated[bool, typer.Option(help="Reissue the broker certificate if the hosts changed.")] = False,
    container_owners: ContainerOwnersOption = False,
) -> None:
    """Create the CA, CRL, broker, orchestrator and operator certificates (re-running is safe)."""
    pki = _run(lambda: FederationPki.init(directory, federation, broker_host or (), force=force))
    console.print(f"PKI of federation [bold]{pki.federation}[/bold] ready in {directory}")
    if container_owners:
        _give_keys(pki, [BROKER, ORCHESTRATOR])
    console.print(f"next: `fedmq pki issue-site {directory} SITE_ID` for each hospital")


def _issue(directory: Path, issue: Callable[[FederationPki], Issued], container_owners: bool
           ) -> tuple[FederationPki, Issued]:
    """Issue one client certificate, say where it went, and hand its key to the container user if asked."""
    pki = _run(lambda: FederationPki(directory))
    issued = _run(lambda: issue(pki))
    console.print(f"issued {issued.name}: {issued.cert_path} and {issued.key_path}")
    if container_owners:
        _give_keys(pki, [issued.name])
    return pki, issued


@app.command("issue-site")
def issue_site(
    directory: DirArg,
    site_id: Annotated[str, typer.Argument(help="Site id: the certificate CN and the site's topic level.")],
    force: Annotated[bool, typer.Option(help="Replace an existing certificate (the old one is revoked).")] = False,
    container_owners: ContainerOwnersOption = False,
) -> None:
    """Issue one hospital's client certificate."""
    _, issued = _issue(directory, lambda pki: pki.issue_site(site_id, force=force), container_owners)
    console.print(f"hand the site ca.crt, crl.pem, {issued.cert_path.name} and {issued.key_path.name} over a "
                  f"secure channel; nothing else in {directory}")


@app.command("issue-monitor")
def issue_monitor(
    directory: DirArg,
    name: Annotated[str, typer.Argument(help="Monitor name; the certificate CN becomes monitor-NAME.")],
    force: Annotated[bool, typer.Option(help="Replace an existing certificate (the old one is revoked).")] = False,
    container_owners: ContainerOwnersOption = False,
) -> None:
    """Issue a read-only monitor certificate (fleet state, summaries and alerts; no chunks, no publishing)."""
    pki, issued = _issue(directory, lambda pki: pki.issue_monitor(name, force=force), container_owners)
    if name not in CONTAINER_MONITORS:
        console.print(f"the broker admits it once its ACL names it: `python -m shared.broker_acl OUT_DIR --monitor "
                      f"{name}` (add every other monitor too), mount OUT_DIR as the broker's config and send it SIGHUP")
    console.print(f"run `fedmq exporter --broker mqtts://BROKER:8883 --tls-ca {pki.ca_cert_path} --tls-cert "
                  f"{issued.cert_path} --tls-key {issued.key_path}` to serve Prometheus metrics with it")


@app.command()
def revoke(
    directory: DirArg,
    site_id: Annotated[str, typer.Argument(help="Site id (or orchestrator / operator / monitor-NAME) to revoke.")],
) -> None:
    """Revoke an identity's certificate and re-sign the CRL the broker reads."""
    pki = _run(lambda: FederationPki(directory))
    cert = _run(lambda: pki.revoke(site_id))
    console.print(f"revoked {site_id} (serial {cert.serial_number:x}); CRL written to {pki.crl_path}")
    console.print("copy crl.pem to the broker and send it SIGHUP (e.g. `docker kill -s HUP mosquitto`): "
                  "it only rereads the CRL then, and open connections stay open until they reconnect")
    console.print("copy it beside ca.crt at the orchestrator and at every hospital too: secure aggregation "
                  "checks each site's certificate against it there, at the next round, without a restart")


@app.command("list")
def list_certs(directory: DirArg) -> None:
    """Show every certificate with its serial, expiry and revocation."""
    pki = _run(lambda: FederationPki(directory))
    infos = _run(pki.certificates)
    table = Table(title=f"federation {pki.federation} ({directory})")
    for column in ("role", "subject", "serial", "expires (UTC)", "revoked"):
        # fold, never truncate: a cut serial cannot be matched against the CRL.
        table.add_column(column, overflow="fold")
    for info in infos:
        revoked = f"[red]{info.revoked_at:%Y-%m-%d %H:%M}[/red]" if info.revoked_at else "no"
        table.add_row(info.role, info.subject, f"{info.serial:x}", f"{info.not_after:%Y-%m-%d}", revoked)
    console.print(table)
    shown = {info.serial for info in infos}
    older = sum(1 for serial in _run(pki.revoked) if serial not in shown)
    if older:
        console.print(f"the CRL also revokes {older} replaced certificate(s) not shown")
