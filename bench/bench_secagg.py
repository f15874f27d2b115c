"""Cost of secure aggregation (shared.privacy.secagg) against plain aggregation, per round.

For each site count (default 4, 16, 64) and vector length, one process simulates the sites
and the server with the real ``SecAggClient`` / ``SecAggServer`` (only the transport is a
list, as in ``secagg.run_protocol``) and measures, per round:

* time per protocol step: for the sites the per-client median of each step
  (advertise = fresh X25519 key pairs + identity signature; share_keys = roster
  verification + Shamir split + AES-GCM per peer; quantize = fixed-point conversion (and,
  sparse, the index set); mask = opening the shares + self and pairwise AES-CTR masks;
  unmask = the response), for the server each step's total (collect_advertisements,
  route_shares, collect_masked, unmask incl. dequantize). "critical path" = sum over the
  steps of (slowest client + server), the round's duration if sites ran in parallel
  and the network were free. Wall-clock (perf_counter); CPU time (thread_time) is in
  the JSON too, and the critical path's secagg/plain ratio is also reported in CPU time,
  since the wall time on a loaded machine includes waiting for the CPU;
* bytes: the message dataclasses have no wire format, so the honest size of their
  fields is counted: site ids and counts 4 B, X25519 public keys 32 B, signatures their
  real length (Ed25519 64 B, ECDSA P-256 DER 70-72 B), nonce 12 B, AES-GCM ciphertext its
  real length (two framed Shamir shares + 16 B tag), masked vectors 4 B per uint32,
  Shamir shares ``len(Share.to_bytes())`` plus a 4 B key. Broker/MQTT framing and the
  model download (the same with and without secagg) are not counted;
* the PLAIN baseline in the same run: each site encodes its float32 update with
  ``shared.codec.encode_tensors(..., CompressionSettings())`` (dense float32, zstd 3),
  the server decodes every message and sums; ratios secagg/plain for bytes and time.

Extra cases: a dropout round (``--dropout`` of the ``--dropout-sites`` sites drop after
masking: their masked vector never arrives, the server reconstructs their mask keys) and
sparse secagg (every site masks the same ``k = --sparse-fraction`` of positions from
``round_index_set``), with the codec's plain top-k int8 size for reference. Every secagg
sum is checked against the plain float sum (within the quantization step).

    python bench/bench_secagg.py [--sites 4,16,64] [--params 100000] [--large-params 1000000]
        [--large-max-sites 16] [--reps 2] [--dropout 0.1] [--dropout-sites 16]
        [--sparse-fraction 0.01] [--identity ed25519|p256] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import cryptography
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shared.codec import CompressionSettings, decode_tensors, encode_tensors
from shared.privacy.secagg import (
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    RoundConfig,
    SecAggClient,
    SecAggServer,
    UnmaskingResponse,
    dequantize,
    quantize,
    round_index_set,
)

CLIENT_STEPS = ("advertise", "share_keys", "quantize", "mask", "unmask")
SERVER_STEPS = ("collect_advertisements", "route_shares", "collect_masked", "unmask")
BOUND = 0.5        # quantization range; updates are N(0, 0.01), far inside it
ID_BYTES = 4       # site id / list count on the wire


# --- machine -------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                                  check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "numpy": np.__version__, "cryptography": cryptography.__version__,
        "commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
        "secagg_modified": bool(git("status", "--porcelain", "--", "shared/privacy").strip()),
    }


# --- wire sizes (the dataclasses have no serialization; count their fields) ----------------

def ad_bytes(ad: KeyAdvertisement) -> int:
    return ID_BYTES + len(ad.encryption_public) + len(ad.mask_public) + len(ad.signature)


def share_bytes(item: EncryptedShares) -> int:
    return 2 * ID_BYTES + len(item.nonce) + len(item.ciphertext)


def masked_bytes(item: MaskedInput) -> int:
    assert item.vector.dtype.itemsize == 4
    return ID_BYTES + item.vector.nbytes


def response_bytes(r: UnmaskingResponse) -> int:
    shares = [*r.self_seed_shares.values(), *r.mask_key_shares.values()]
    return ID_BYTES + 2 * ID_BYTES + sum(ID_BYTES + len(s.to_bytes()) for s in shares)


# --- timing ----------------------------------------------------------------------------------

class Clock:
    """Wall and CPU time of one block."""

    def __enter__(self) -> Self:
        self.w0, self.c0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.thread_time() - self.c0


def _new_stats(sites: list[int]) -> dict:
    return {"client": {s: {step: [0.0, 0.0] for step in CLIENT_STEPS} for s in sites},
            "server": {step: [0.0, 0.0] for step in SERVER_STEPS},
            "sent": dict.fromkeys(sites, 0), "recv": dict.fromkeys(sites, 0),
            "server_sent": 0, "server_recv": 0}


def _add(slot: list[float], clock: Clock) -> None:
    slot[0] += clock.wall
    slot[1] += clock.cpu


# --- one round of each kind ------------------------------------------------------------------

def identity_keys(n: int, kind: str) -> dict:
    gen = (ed25519.Ed25519PrivateKey.generate if kind == "ed25519"
           else lambda: ec.generate_private_key(ec.SECP256R1()))
    return {site: gen() for site in range(1, n + 1)}


def secagg_round(updates: list[np.ndarray], identities: dict, drop: set[int], sparse_k: int | None,
                 rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """One real protocol round over ``updates`` (site i+1 owns updates[i]); returns stats and the float sum."""
    n, length = len(updates), updates[0].size
    sites = sorted(identities)
    public = {s: k.public_key() for s, k in identities.items()}
    round_seed = secrets.token_bytes(16)
    config = RoundConfig(round_seed, n // 2 + 1, sparse_k or length)
    st = _new_stats(sites)

    clients = {}
    for s in sites:
        with Clock() as c:
            clients[s] = SecAggClient(s, config, identities[s])  # X25519 key pairs + signature
            ad = clients[s].advertise()
        _add(st["client"][s]["advertise"], c)
        st["sent"][s] += ad_bytes(ad)
    ads = [clients[s].advertise() for s in sites]
    server = SecAggServer(config, public)
    st["server_recv"] += sum(map(ad_bytes, ads))
    with Clock() as c:
        roster = server.collect_advertisements(ads)
    _add(st["server"]["collect_advertisements"], c)
    roster_size = ID_BYTES + sum(map(ad_bytes, roster))
    for s in sites:
        st["recv"][s] += roster_size
    st["server_sent"] += n * roster_size

    outgoing = []
    for s in sites:
        with Clock() as c:
            items = clients[s].share_keys(roster, public)
        _add(st["client"][s]["share_keys"], c)
        size = sum(map(share_bytes, items))
        st["sent"][s] += size
        st["server_recv"] += size
        outgoing.extend(items)
    with Clock() as c:
        routed = server.route_shares(outgoing)
    _add(st["server"]["route_shares"], c)
    for s, items in routed.items():
        size = sum(map(share_bytes, items))
        st["recv"][s] += size
        st["server_sent"] += size

    masked = []
    for s in sorted(routed):
        with Clock() as c:
            if sparse_k is not None:
                index = round_index_set(round_seed, length, sparse_k)
                vector = quantize(updates[s - 1][index], BOUND, n, rng)
            else:
                vector = quantize(updates[s - 1], BOUND, n, rng)
        _add(st["client"][s]["quantize"], c)
        with Clock() as c:
            item = clients[s].mask_input(vector, routed[s])
        _add(st["client"][s]["mask"], c)
        if s not in drop:  # a dropped site computed its masked vector but it never arrives
            masked.append(item)
            st["sent"][s] += masked_bytes(item)
            st["server_recv"] += masked_bytes(item)
    with Clock() as c:
        survivors = server.collect_masked(masked)
    _add(st["server"]["collect_masked"], c)

    responses = []
    for s in survivors:
        st["recv"][s] += ID_BYTES * (1 + len(survivors))
        st["server_sent"] += ID_BYTES * (1 + len(survivors))
        with Clock() as c:
            r = clients[s].unmask(survivors)
        _add(st["client"][s]["unmask"], c)
        responses.append(r)
        st["sent"][s] += response_bytes(r)
        st["server_recv"] += response_bytes(r)
    with Clock() as c:
        total = dequantize(server.unmask(responses), BOUND, n)
        if sparse_k is not None:
            dense = np.zeros(length)
            dense[round_index_set(round_seed, length, sparse_k)] = total
            total = dense
    _add(st["server"]["unmask"], c)
    return st, total


def plain_round(updates: list[np.ndarray], drop: set[int]) -> tuple[dict, np.ndarray]:
    """Each surviving site encodes its float32 update (codec defaults); the server decodes and sums."""
    length = updates[0].size
    settings = CompressionSettings()
    blobs, encode, sizes = [], [], []
    for i, update in enumerate(updates):
        if i + 1 in drop:
            continue
        with Clock() as c:
            blob = encode_tensors({"update": update}, settings)
        encode.append((c.wall, c.cpu))
        sizes.append(len(blob))
        blobs.append(blob)
    with Clock() as c:
        total = np.zeros(length, dtype=np.float32)
        for blob in blobs:
            np.add(total, decode_tensors(blob, {"update": (length,)}, max_decoded_bytes=8 * length + 2**20)["update"],
                   out=total)
    return {"encode": encode, "sizes": sizes, "server": (c.wall, c.cpu)}, total.astype(np.float64)


# --- a case: reps of plain + secagg ----------------------------------------------------------

def summarise_secagg(rounds: list[dict]) -> dict:
    """Median over reps of: per-client median per step, max client per step, server per step; bytes."""
    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    out: dict = {"client_median": {}, "client_max": {}, "server": {}, "client_median_cpu": {}, "server_cpu": {}}
    for step in CLIENT_STEPS:
        out["client_median"][step] = med([med([c[step][0] for c in r["client"].values()]) for r in rounds])
        out["client_median_cpu"][step] = med([med([c[step][1] for c in r["client"].values()]) for r in rounds])
        out["client_max"][step] = med([max(c[step][0] for c in r["client"].values()) for r in rounds])
    for step in SERVER_STEPS:
        out["server"][step] = med([r["server"][step][0] for r in rounds])
        out["server_cpu"][step] = med([r["server"][step][1] for r in rounds])
    out["client_total"] = med([med([sum(v[0] for v in c.values()) for c in r["client"].values()]) for r in rounds])
    out["client_total_cpu"] = med([med([sum(v[1] for v in c.values()) for c in r["client"].values()]) for r in rounds])
    out["server_total"] = sum(out["server"].values())
    out["server_total_cpu"] = sum(out["server_cpu"].values())
    phases = (("advertise",), ("share_keys",), ("quantize", "mask"), ("unmask",))
    for key, k in (("critical_path", 0), ("critical_path_cpu", 1)):
        crit = []
        for r in rounds:
            path = 0.0
            for names, server_step in zip(phases, SERVER_STEPS, strict=True):
                path += max(sum(c[s][k] for s in names) for c in r["client"].values()) + r["server"][server_step][k]
            crit.append(path)
        out[key] = med(crit)
    last = rounds[-1]
    out["client_sent"] = statistics.median(last["sent"].values())
    out["client_recv"] = statistics.median(last["recv"].values())
    out["server_sent"], out["server_recv"] = last["server_sent"], last["server_recv"]
    return out


def summarise_plain(rounds: list[dict]) -> dict:
    encode = statistics.median([statistics.median([e[0] for e in r["encode"]]) for r in rounds])
    encode_max = statistics.median([max(e[0] for e in r["encode"]) for r in rounds])
    encode_max_cpu = statistics.median([max(e[1] for e in r["encode"]) for r in rounds])
    server = statistics.median([r["server"][0] for r in rounds])
    sizes = rounds[-1]["sizes"]
    return {"client_total": encode, "client_total_cpu": statistics.median(
                [statistics.median([e[1] for e in r["encode"]]) for r in rounds]),
            "server_total": server, "server_total_cpu": statistics.median([r["server"][1] for r in rounds]),
            "critical_path": encode_max + server,
            "critical_path_cpu": encode_max_cpu + statistics.median([r["server"][1] for r in rounds]),
            "client_sent": statistics.median(sizes), "client_recv": 0,
            "server_sent": 0, "server_recv": sum(sizes)}


def run_case(n: int, length: int, reps: int, drop_count: int, sparse_k: int | None, kind: str,
             seed: int, with_plain: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    updates = [rng.normal(0.0, 0.01, length).astype(np.float32) for _ in range(n)]
    drop = {int(x) for x in rng.choice(np.arange(1, n + 1), size=drop_count, replace=False)} if drop_count else set()
    expected = np.sum([u.astype(np.float64) for i, u in enumerate(updates) if i + 1 not in drop], axis=0)
    step = BOUND / ((2**31 - 1) // n)
    sec_rounds, plain_rounds = [], []
    for _ in range(reps):
        if with_plain:
            gc.collect()
            p, ptotal = plain_round(updates, drop)
            plain_rounds.append(p)
            assert np.max(np.abs(ptotal - expected)) < 1e-4, "plain sum wrong"
        gc.collect()
        identities = identity_keys(n, kind)  # long-term keys: not part of the round's cost
        s, total = secagg_round(updates, identities, drop, sparse_k, rng)
        sec_rounds.append(s)
        # sparse: only the round's k positions are aggregated, the rest of ``total`` is zero
        err = float(np.max(np.abs(total - (expected if sparse_k is None else np.where(total != 0, expected, 0)))))
        assert err <= (n + 1) * step, f"secagg sum off by {err} (> {(n + 1) * step})"
    case = {"sites": n, "params": length, "dropped": sorted(drop), "sparse_k": sparse_k, "reps": reps,
            "threshold": n // 2 + 1, "secagg": summarise_secagg(sec_rounds), "max_abs_error": err}
    if with_plain:
        case["plain"] = summarise_plain(plain_rounds)
    return case


# --- report ----------------------------------------------------------------------------------

def fmt_bytes(b: float) -> str:
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s >= 0.1 else f"{s * 1e3:.1f} ms"


def label(c: dict) -> str:
    extra = []
    if c["dropped"]:
        extra.append(f"{len(c['dropped'])} drop")
    if c["sparse_k"]:
        extra.append(f"sparse k={c['sparse_k']}")
    return f"{c['sites']} x {c['params']:,}" + (f" ({', '.join(extra)})" if extra else "")


def report(cases: list[dict], info: dict, argv: list[str]) -> str:
    lines = [f"# Secure aggregation vs plain aggregation ({info['date']})", "",
             f"Command: `python {' '.join(argv)}`  ",
             (f"Machine: {info['cpu']}, {info['cpu_count']} CPUs (affinity {info['affinity']}), load average "
             f"{' / '.join(map(str, info['load_average']))} at start; {info['system']}, Python {info['python']}, "
             f"numpy {info['numpy']}, cryptography {info['cryptography']}; commit {info['commit']}"
             f"{' (shared/privacy modified)' if info['secagg_modified'] else ''}"), ""]
    lines += ["## Bytes per round (secagg message fields counted; plain = codec dense f32 + zstd 3)", "",
              ("| sites x params | client sends | client receives | server receives | server sends "
              "| plain client sends | plain server receives | sent ratio (client) | server-recv ratio |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        s, p = c["secagg"], c.get("plain")
        lines.append(
            f"| {label(c)} | {fmt_bytes(s['client_sent'])} | {fmt_bytes(s['client_recv'])} "
            f"| {fmt_bytes(s['server_recv'])} | {fmt_bytes(s['server_sent'])} "
            + (f"| {fmt_bytes(p['client_sent'])} | {fmt_bytes(p['server_recv'])} "
               f"| {s['client_sent'] / p['client_sent']:.3f} | {s['server_recv'] / p['server_recv']:.3f} |"
               if p else "| - | - | - | - |"))
    lines += ["", "## Time per round (wall; client = per-client median, server = total)", "",
              ("| sites x params | client advertise | share_keys | quantize | mask | unmask | client total "
              "| server adv | route | collect | unmask | server total | critical path "
              "| plain client | plain server | plain crit. | ratio client | ratio server | ratio crit. "
              "| ratio crit. CPU |"),
              "|---|" + "---|" * 19]
    for c in cases:
        s, p = c["secagg"], c.get("plain")
        cm, sv = s["client_median"], s["server"]
        row = (f"| {label(c)} | " + " | ".join(fmt_s(cm[k]) for k in CLIENT_STEPS)
               + f" | {fmt_s(s['client_total'])} | " + " | ".join(fmt_s(sv[k]) for k in SERVER_STEPS)
               + f" | {fmt_s(s['server_total'])} | {fmt_s(s['critical_path'])} ")
        if p:
            row += (f"| {fmt_s(p['client_total'])} | {fmt_s(p['server_total'])} | {fmt_s(p['critical_path'])} "
                    f"| {s['client_total'] / p['client_total']:.1f} | {s['server_total'] / p['server_total']:.1f} "
                    f"| {s['critical_path'] / p['critical_path']:.1f} "
                    f"| {s['critical_path_cpu'] / p['critical_path_cpu']:.1f} |")
        else:
            row += "| - | - | - | - | - | - | - |"
        lines.append(row)
    sparse = [c for c in cases if c["sparse_k"]]
    if sparse:
        lines += ["", "## Sparse secagg (shared index set) vs dense secagg, same site count", "",
                  ("| sites x params | k | client sends sparse / dense | server receives sparse / dense "
                  "| plain top-k int8 client sends | client total time sparse / dense |"), "|---|---|---|---|---|---|"]
        for c in sparse:
            dense = next((d for d in cases if d["sites"] == c["sites"] and d["params"] == c["params"]
                          and not d["sparse_k"] and not d["dropped"]), None)
            if dense is None:
                continue
            s, d = c["secagg"], dense["secagg"]
            lines.append(
                f"| {c['sites']} x {c['params']:,} | {c['sparse_k']:,} "
                f"| {fmt_bytes(s['client_sent'])} / {fmt_bytes(d['client_sent'])} ({s['client_sent'] / d['client_sent']:.3f}) "
                f"| {fmt_bytes(s['server_recv'])} / {fmt_bytes(d['server_recv'])} ({s['server_recv'] / d['server_recv']:.3f}) "
                f"| {fmt_bytes(c.get('plain_topk_bytes', 0))} "
                f"| {fmt_s(s['client_total'])} / {fmt_s(d['client_total'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sites", default="4,16,64", help="comma-separated site counts")
    ap.add_argument("--params", type=int, default=100_000, help="update vector length for every site count")
    ap.add_argument("--large-params", type=int, default=1_000_000, help="second length, 0 to skip")
    ap.add_argument("--large-max-sites", type=int, default=16, help="run --large-params only up to this many sites")
    ap.add_argument("--reps", type=int, default=2, help="measured rounds per case (median reported)")
    ap.add_argument("--dropout", type=float, default=0.1, help="fraction of sites dropping after masking")
    ap.add_argument("--dropout-sites", type=int, default=16, help="site count of the dropout case (0: none)")
    ap.add_argument("--sparse-fraction", type=float, default=0.01, help="k / params of the sparse case (0: none)")
    ap.add_argument("--identity", choices=("ed25519", "p256"), default="p256", help="identity signature scheme")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = ap.parse_args()
    sites = [int(x) for x in args.sites.split(",") if x]
    info = machine_info()
    started = time.perf_counter()
    cases = []

    def run(*a, **kw) -> None:
        t0 = time.perf_counter()
        case = run_case(*a, kind=args.identity, seed=args.seed, **kw)
        case["case_seconds"] = time.perf_counter() - t0
        print(f"  done {label(case)} in {case['case_seconds']:.1f} s", file=sys.stderr, flush=True)
        cases.append(case)

    run_case(4, 1000, 1, 0, None, kind=args.identity, seed=args.seed)  # warm-up (imports, zstd), not reported
    for n in sites:
        run(n, args.params, args.reps, 0, None)
        if args.sparse_fraction:
            k = max(1, round(args.sparse_fraction * args.params))
            run(n, args.params, args.reps, 0, k, with_plain=False)
            update = np.random.default_rng(args.seed).normal(0, 0.01, args.params).astype(np.float32)
            cases[-1]["plain_topk_bytes"] = len(encode_tensors(
                {"update": update}, CompressionSettings(mode="sparse", topk_count=k)))
        if n == args.dropout_sites and args.dropout:
            run(n, args.params, args.reps, max(1, round(args.dropout * n)), None)
        if args.large_params and n <= args.large_max_sites:
            run(n, args.large_params, args.reps, 0, None)
    info["bench_seconds"] = round(time.perf_counter() - started, 1)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(report(cases, info, sys.argv))
    print(f"\nBenchmark time {info['bench_seconds']} s; load average at end "
          f"{' / '.join(map(str, info['load_average_end']))}.")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"json": str(args.json)},
                                         "cases": cases}, indent=2, default=str))


if __name__ == "__main__":
    main()
