"""Shamir sharing and secure aggregation: secrecy of masked inputs, exact sums, dropouts, forgery."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shared.privacy import shamir
from shared.privacy.secagg import (
    RoundConfig,
    SecAggClient,
    SecAggError,
    SecAggServer,
    dequantize,
    prg_uint32,
    quantize,
    round_index_set,
    run_protocol,
    simulate_round,
)

# --------------------------------------------------------------------------- Shamir


@settings(max_examples=60, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=150),
    n=st.integers(2, 9),
    data=st.data(),
)
def test_any_t_shares_recover_the_secret(secret, n, data):
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, n, t)
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(t, n))]
    assert shamir.combine(subset, t) == secret


def test_leading_zero_bytes_survive():
    secret = b"\x00\x00\x01" + bytes(29)
    assert shamir.combine(shamir.split(secret, 5, 3)[1:4], 3) == secret


def test_fewer_than_t_shares_is_a_clear_error():
    shares = shamir.split(b"k" * 32, 5, 3)
    with pytest.raises(shamir.ShamirError, match="at least 3 shares"):
        shamir.combine(shares[:2], 3)


def test_t_minus_one_shares_are_consistent_with_every_secret():
    """Perfect secrecy, concretely: for t = 2 one share fits a line through ANY secret."""
    rng = random.Random(1)
    one = shamir.split(b"\x05", 3, 2, rng)[0]
    for candidate in (0, 5, 200):
        slope = (one.values[0] - candidate) * pow(one.x, -1, shamir.PRIME) % shamir.PRIME
        assert (candidate + slope * one.x) % shamir.PRIME == one.values[0]
    # ...and the shares themselves are randomised, not a function of the secret alone.
    assert shamir.split(b"\x05", 3, 2)[0] != shamir.split(b"\x05", 3, 2)[0]


def test_corrupted_extra_share_is_detected():
    shares = shamir.split(b"s" * 32, 5, 3)
    bad = replace(shares[4], values=((shares[4].values[0] + 1) % shamir.PRIME,))
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.combine([*shares[:4], bad], 3)


@pytest.mark.parametrize("position", [0, 2, 4])
def test_corrupted_share_anywhere_is_detected(position):
    """The parity check covers the first t shares too, not only the extra ones."""
    shares = shamir.split(b"s" * 70, 5, 3)
    first, second = shares[position].values
    bad = replace(shares[position], values=(first, (second + 7) % shamir.PRIME))
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.combine([*shares[:position], bad, *shares[position + 1 :]], 3)


def test_foreign_share_is_detected():
    """A genuine share of another secret with the same length and holder does not pass."""
    mine, other = shamir.split(b"a" * 32, 5, 3), shamir.split(b"b" * 32, 5, 3)
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.combine([*mine[:3], other[3]], 3)
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.combine([other[0], *mine[1:]], 3)


def test_recombiner_reuses_one_holder_set_for_many_secrets():
    holders = [3, 9, 17, 40, 41, 77, 100]
    recombiner = shamir.Recombiner(holders[1:6], 4)
    rng = random.Random(3)
    for length in (1, 32, 64, 65, 200):
        secret = bytes(rng.randrange(256) for _ in range(length))
        shares = {s.x: s for s in shamir.split(secret, len(holders), 4, xs=holders)}
        picked = [shares[x] for x in holders[1:6]]
        assert recombiner.combine(picked) == secret
        assert recombiner.combine(picked[::-1]) == secret  # any order of the same holders
    with pytest.raises(shamir.ShamirError, match="expected holders"):
        recombiner.combine([shares[x] for x in holders[:5]])
    with pytest.raises(shamir.ShamirError, match="expected one share from each"):
        recombiner.combine(picked[:4])


def test_lagrange_weights_and_batch_inverse():
    xs = [2, 5, 11, 12]
    weights = shamir.lagrange_weights_at_zero(xs)
    for coefficients in ([7, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 9]):
        ys = [sum(c * x**i for i, c in enumerate(coefficients)) % shamir.PRIME for x in xs]
        assert sum(w * y for w, y in zip(weights, ys)) % shamir.PRIME == coefficients[0]
    values = [1, 2, 3, shamir.PRIME - 1, 2**300]
    assert shamir.batch_inverse(values) == [pow(v, -1, shamir.PRIME) for v in values]
    with pytest.raises(shamir.ShamirError):
        shamir.batch_inverse([1, 0])


def test_share_encoding_round_trips_and_rejects_garbage():
    share = shamir.split(b"x" * 70, 4, 2, xs=[10, 20, 30, 40])[2]
    assert share.x == 30 and len(share.values) == 2
    assert shamir.Share.from_bytes(share.to_bytes()) == share
    with pytest.raises(shamir.ShamirError):
        shamir.Share.from_bytes(share.to_bytes()[:-1])
    with pytest.raises(shamir.ShamirError):
        shamir.Share.from_bytes(b"\x00")


@pytest.mark.parametrize(
    ("secret", "n", "t", "xs"),
    [(b"", 3, 2, None), (b"a", 3, 4, None), (b"a", 3, 0, None), (b"a", 3, 2, [1, 1, 2]), (b"a", 2, 2, [0, 1])],
)
def test_split_rejects_bad_parameters(secret, n, t, xs):
    with pytest.raises(shamir.ShamirError):
        shamir.split(secret, n, t, xs=xs)


# --------------------------------------------------------------------------- fixed point


def test_quantization_round_trip_error_is_below_one_step():
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, 10_000)
    step = 1.0 / ((2**31 - 1) // 10)
    restored = dequantize(quantize(values, 1.0, 10), 1.0, 10)
    assert np.max(np.abs(restored - values)) <= step / 2 + 1e-15


def test_sum_of_num_sites_extremes_does_not_wrap():
    for sign in (1.0, -1.0):
        q = quantize(np.full(3, sign * 2.5), 2.5, 7)
        total = np.zeros(3, np.uint32)
        for _ in range(7):
            total += q
        np.testing.assert_allclose(dequantize(total, 2.5, 7), sign * 7 * 2.5, rtol=1e-8)


def test_values_beyond_the_bound_saturate():
    restored = dequantize(quantize(np.array([5.0, -5.0, 0.5]), 1.0, 3), 1.0, 3)
    np.testing.assert_allclose(restored, [1.0, -1.0, 0.5], atol=1e-8)


def test_stochastic_rounding_is_unbiased():
    num_sites, bound = 2**20, 1.0  # coarse grid so that rounding bias would be visible
    step = bound / ((2**31 - 1) // num_sites)
    value = np.full(200_000, 0.3 * step)
    rng = np.random.default_rng(2)
    stochastic = dequantize(quantize(value, bound, num_sites, rng), bound, num_sites)
    nearest = dequantize(quantize(value, bound, num_sites), bound, num_sites)
    assert np.all(nearest == 0.0)  # round-to-nearest loses the value entirely...
    assert stochastic.mean() == pytest.approx(0.3 * step, rel=0.02)  # ...stochastic keeps it


@pytest.mark.parametrize(
    "values", [np.array([np.nan]), np.ones((2, 2)), np.array([1, 2], np.int32)]
)
def test_quantize_rejects_bad_vectors(values):
    with pytest.raises(ValueError):
        quantize(values, 1.0, 3)


# --------------------------------------------------------------------------- PRG and index sets


def test_prg_is_deterministic_seed_dependent_and_uniform():
    seed = bytes(range(32))
    a = prg_uint32(seed, 100_000)
    np.testing.assert_array_equal(a, prg_uint32(seed, 100_000))
    np.testing.assert_array_equal(a[:10], prg_uint32(seed, 10))  # a prefix, as a stream should be
    assert a.dtype == np.uint32 and a.size == 100_000
    assert np.mean(a == prg_uint32(bytes(31) + b"\x01", 100_000)) < 0.001
    counts = np.bincount((a >> 28).astype(np.int64), minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-4
    with pytest.raises(ValueError):
        prg_uint32(b"short", 4)


@pytest.mark.parametrize("length", [0, 1, 16_383, 16_384, 16_385, 100_003])
def test_prg_is_exactly_the_aes_ctr_keystream(length):
    """Sites and server must agree bit for bit, however the keystream is produced in chunks."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(100, 132))
    reference = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(4 * length))
    np.testing.assert_array_equal(prg_uint32(seed, length), np.frombuffer(reference, "<u4"))


def test_round_index_set_is_shared_sorted_and_uniform():
    seed = b"round-7-of-fed-a"
    idx = round_index_set(seed, 50_000, 1_000)
    np.testing.assert_array_equal(idx, round_index_set(seed, 50_000, 1_000))
    assert idx.size == 1_000 and np.all(np.diff(idx) > 0) and 0 <= idx[0] and idx[-1] < 50_000
    assert not np.array_equal(idx, round_index_set(b"round-8-of-fed-a", 50_000, 1_000))
    np.testing.assert_array_equal(round_index_set(seed, 10, 10), np.arange(10))
    # Over many rounds every position is picked about equally often.
    hits = np.zeros(100, np.int64)
    for r in range(2_000):
        hits[round_index_set(r.to_bytes(16, "big"), 100, 10)] += 1
    assert stats.chisquare(hits).pvalue > 1e-4
    with pytest.raises(ValueError):
        round_index_set(seed, 10, 11)


# --------------------------------------------------------------------------- protocol helpers


def _setup(n, t, length, key_kind="ed25519"):
    def identity():
        if key_kind == "ed25519":
            return ed25519.Ed25519PrivateKey.generate()
        return ec.generate_private_key(ec.SECP256R1())

    config = RoundConfig(b"fed-test/round-1", t, length)
    identities = {site: identity() for site in range(1, n + 1)}
    public = {site: key.public_key() for site, key in identities.items()}
    clients = {site: SecAggClient(site, config, key) for site, key in identities.items()}
    return config, public, clients, SecAggServer(config, public)


def _mask_all(n, t, inputs):
    config, public, clients, server = _setup(n, t, inputs[0].size)
    roster = server.collect_advertisements([c.advertise() for c in clients.values()])
    routed = server.route_shares([e for c in clients.values() for e in c.share_keys(roster, public)])
    masked = {s: clients[s].mask_input(inputs[s - 1], routed[s]) for s in routed}
    return clients, server, masked


def _modular_sum(vectors):
    total = np.zeros_like(vectors[0], dtype=np.uint32)
    for v in vectors:
        total += v
    return total


# --------------------------------------------------------------------------- secrecy


def test_masked_update_is_indistinguishable_from_uniform_noise():
    length = 1 << 16
    plain_update = 0.01 * np.sin(np.linspace(0, 40, length))  # smooth, tiny: very non-uniform in the ring
    inputs = [quantize(plain_update, 1.0, 3) for _ in range(3)]
    _, _, masked = _mask_all(3, 2, inputs)
    observed = masked[1].vector
    plain = inputs[0]

    def byte_pvalue(vector):
        counts = np.bincount(vector.view(np.uint8), minlength=256)
        return stats.chisquare(counts).pvalue

    def bucket_pvalue(vector):
        return stats.chisquare(np.bincount((vector >> 26).astype(np.int64), minlength=64)).pvalue

    def correlation(vector):
        signed = [v.view(np.int32).astype(np.float64) for v in (vector, plain)]
        return abs(np.corrcoef(*signed)[0, 1])

    # The same statistics flag the unmasked vector at once, so these checks have teeth.
    assert byte_pvalue(plain) < 1e-12 and bucket_pvalue(plain) < 1e-12
    assert correlation(plain.copy()) > 0.99
    assert byte_pvalue(observed) > 1e-4
    assert bucket_pvalue(observed) > 1e-4
    assert correlation(observed) < 4 / np.sqrt(length)
    # Masks are fresh per round: the same input masks differently next time.
    _, _, again = _mask_all(3, 2, inputs)
    assert np.mean(again[1].vector == observed) < 0.001


# --------------------------------------------------------------------------- correctness and dropouts


def test_unmasked_sum_equals_plain_modular_sum_exactly():
    rng = np.random.default_rng(4)
    inputs = [rng.integers(0, 2**32, 5_000, dtype=np.uint32) for _ in range(5)]
    np.testing.assert_array_equal(run_protocol(inputs, 3), _modular_sum(inputs))


def test_one_of_four_dropping_after_masking_still_yields_the_others_sum():
    rng = np.random.default_rng(5)
    inputs = [rng.integers(0, 2**32, 2_000, dtype=np.uint32) for _ in range(4)]
    total = run_protocol(inputs, 3, drop_after_masking={2})
    np.testing.assert_array_equal(total, _modular_sum([inputs[0], inputs[1], inputs[3]]))


def test_survivor_silent_at_unmasking_is_still_counted():
    rng = np.random.default_rng(6)
    inputs = [rng.integers(0, 2**32, 2_000, dtype=np.uint32) for _ in range(5)]
    total = run_protocol(inputs, 3, drop_after_masking={0}, drop_before_unmasking={4})
    np.testing.assert_array_equal(total, _modular_sum(inputs[1:]))


def test_64_sites_with_6_dropouts_recover_the_exact_sum_quickly():
    n, t, length = 64, 33, 1_000
    rng = np.random.default_rng(10)
    inputs = [rng.integers(0, 2**32, length, dtype=np.uint32) for _ in range(n)]
    dropped = {3, 17, 18, 40, 55, 64}
    _, public, clients, server = _setup(n, t, length)
    roster = server.collect_advertisements([c.advertise() for c in clients.values()])
    routed = server.route_shares([e for c in clients.values() for e in c.share_keys(roster, public)])
    masked = [clients[s].mask_input(inputs[s - 1], routed[s]) for s in sorted(routed)]
    survivors = server.collect_masked([m for m in masked if m.site_id not in dropped])
    responses = [clients[s].unmask(survivors) for s in survivors]
    started = time.thread_time()
    total = server.unmask(responses)
    cpu = time.thread_time() - started
    np.testing.assert_array_equal(total, _modular_sum([inputs[s - 1] for s in survivors]))
    # 58 responders, 64 secrets: the old per-secret re-interpolation took over a second here;
    # with the weights computed once it is milliseconds plus 6 x 58 key agreements and PRGs.
    assert cpu < 0.5, f"server unmask took {cpu:.2f} s of CPU"


def test_corrupted_or_foreign_unmasking_share_is_reported():
    inputs = [np.full(6, i, np.uint32) for i in range(5)]
    clients, server, masked = _mask_all(5, 3, inputs)
    survivors = server.collect_masked([masked[s] for s in (1, 2, 3, 5)])  # site 4 dropped
    responses = [clients[s].unmask(survivors) for s in survivors]
    seed_share = responses[1].self_seed_shares[3]
    corrupted = replace(seed_share, values=((seed_share.values[0] + 1) % shamir.PRIME,))
    tampered = replace(responses[1], self_seed_shares={**responses[1].self_seed_shares, 3: corrupted})
    with pytest.raises(SecAggError, match=r"unmasking failed: shares are inconsistent.*self seed of site 3"):
        server.unmask([responses[0], tampered, *responses[2:]])
    # A genuine share of another secret (the holder's share of site 5's seed) is caught too.
    clients, server, masked = _mask_all(5, 3, inputs)
    survivors = server.collect_masked([masked[s] for s in (1, 2, 3, 5)])
    responses = [clients[s].unmask(survivors) for s in survivors]
    foreign = responses[0].mask_key_shares | {4: responses[0].self_seed_shares[5]}
    with pytest.raises(SecAggError, match=r"inconsistent.*mask key of site 4"):
        server.unmask([replace(responses[0], mask_key_shares=foreign), *responses[1:]])


def test_route_shares_rejects_a_duplicated_or_missing_peer():
    _, public, clients, server = _setup(4, 3, 8)
    roster = server.collect_advertisements([c.advertise() for c in clients.values()])
    outgoing = {s: c.share_keys(roster, public) for s, c in clients.items()}
    to_2 = next(e for e in outgoing[1] if e.recipient == 2)
    skewed = [e if e.recipient != 3 else to_2 for e in outgoing[1]]  # two sets for 2, none for 3
    with pytest.raises(SecAggError, match="site 1 did not send exactly one share set"):
        server.route_shares([*skewed, *outgoing[2], *outgoing[3], *outgoing[4]])


def test_route_shares_drops_sites_that_sent_nothing():
    _, public, clients, server = _setup(4, 3, 8)
    roster = server.collect_advertisements([c.advertise() for c in clients.values()])
    outgoing = [e for s in (1, 2, 4) for e in clients[s].share_keys(roster, public)]
    routed = server.route_shares(outgoing)
    assert sorted(routed) == [1, 2, 4]
    for recipient, items in routed.items():
        assert [e.sender for e in items] == [s for s in (1, 2, 4) if s != recipient]
        assert all(e.recipient == recipient for e in items)


@pytest.mark.parametrize(
    ("dropped", "silent"), [({0, 1}, set()), ({3}, {0})], ids=["masking", "unmasking"]
)
def test_fewer_than_t_survivors_fails_cleanly(dropped, silent):
    inputs = [np.full(10, i, np.uint32) for i in range(4)]
    with pytest.raises(SecAggError, match="below the threshold 3"):
        run_protocol(inputs, 3, drop_after_masking=dropped, drop_before_unmasking=silent)


def test_below_threshold_nothing_is_requested_or_revealed():
    inputs = [np.full(10, i, np.uint32) for i in range(4)]
    clients, server, masked = _mask_all(4, 3, inputs)
    with pytest.raises(SecAggError, match="nothing revealed"):
        server.collect_masked([masked[1], masked[2]])
    # The server cannot continue, and a site shown a short survivor list reveals no shares.
    with pytest.raises(SecAggError):
        server.unmask([])
    with pytest.raises(SecAggError, match="revealing nothing"):
        clients[1].unmask([1, 2])


def test_float_round_trip_through_simulate_round():
    rng = np.random.default_rng(8)
    updates = [rng.normal(0, 0.05, 3_000) for _ in range(4)]
    total = simulate_round(updates, 3, {1}, rng, bound=1.0)
    expected = updates[0] + updates[2] + updates[3]
    step = 1.0 / ((2**31 - 1) // 4)
    assert np.max(np.abs(total - expected)) <= 3 * step


def test_sparse_round_masks_only_the_shared_positions():
    rng = np.random.default_rng(9)
    dense = [rng.normal(0, 0.1, 20_000) for _ in range(4)]
    idx = round_index_set(b"fed-a/round-0042", 20_000, 500)
    total = simulate_round([d[idx] for d in dense], 3, set(), rng, bound=1.0)
    assert total.shape == (500,)
    np.testing.assert_allclose(total, np.sum([d[idx] for d in dense], axis=0), atol=1e-6)


# --------------------------------------------------------------------------- authentication and misuse


@pytest.mark.parametrize("key_kind", ["ed25519", "p256"])
def test_tampered_signature_is_rejected(key_kind):
    config, public, clients, server = _setup(3, 2, 8, key_kind)
    ads = [c.advertise() for c in clients.values()]
    forged = replace(ads[1], signature=bytes([ads[1].signature[0] ^ 1]) + ads[1].signature[1:])
    with pytest.raises(SecAggError, match="site 2's advertised keys does not verify"):
        server.collect_advertisements([ads[0], forged, ads[2]])
    with pytest.raises(SecAggError, match="does not verify"):
        clients[1].share_keys([ads[0], forged, ads[2]], public)


def test_substituted_key_and_borrowed_signature_are_rejected():
    _, public, clients, _ = _setup(3, 2, 8)
    ads = [c.advertise() for c in clients.values()]
    substituted = replace(ads[1], mask_public=ads[2].mask_public)
    with pytest.raises(SecAggError, match="site 2"):
        clients[1].share_keys([ads[0], substituted, ads[2]], public)
    _, other_public, _, _ = _setup(3, 2, 8)
    with pytest.raises(SecAggError, match="site 3's advertised keys does not verify"):
        clients[2].share_keys(ads, {**public, 3: other_public[3]})


def test_unsupported_identity_key_is_a_clear_error():
    with pytest.raises(TypeError, match="Ed25519 or EC P-256"):
        SecAggClient(1, RoundConfig(b"r", 2, 4), ec.generate_private_key(ec.SECP384R1()))


def test_tampered_share_ciphertext_is_rejected():
    _, public, clients, server = _setup(3, 2, 8)
    roster = server.collect_advertisements([c.advertise() for c in clients.values()])
    routed = server.route_shares([e for c in clients.values() for e in c.share_keys(roster, public)])
    first = routed[1][0]
    tampered = replace(first, ciphertext=first.ciphertext[:-1] + bytes([first.ciphertext[-1] ^ 1]))
    with pytest.raises(SecAggError, match="failed authentication"):
        clients[1].mask_input(np.zeros(8, np.uint32), [tampered, *routed[1][1:]])


def test_threshold_must_be_a_majority():
    _, public, clients, server = _setup(4, 2, 8)
    with pytest.raises(SecAggError, match="strict majority"):
        server.collect_advertisements([c.advertise() for c in clients.values()])


def test_steps_run_once_and_in_order():
    inputs = [np.full(4, i, np.uint32) for i in range(3)]
    clients, server, masked = _mask_all(3, 2, inputs)
    with pytest.raises(SecAggError, match="stage"):
        clients[1].mask_input(inputs[0], [])
    survivors = server.collect_masked(list(masked.values()))
    clients[1].unmask(survivors)
    with pytest.raises(SecAggError, match="stage"):
        clients[1].unmask(survivors)


def test_site_refuses_a_survivor_list_that_omits_it():
    inputs = [np.full(4, i, np.uint32) for i in range(3)]
    clients, _, _ = _mask_all(3, 2, inputs)
    with pytest.raises(SecAggError, match="omits this site"):
        clients[1].unmask([2, 3])


def test_wrong_vector_is_a_clear_error():
    inputs = [np.full(4, i, np.uint32) for i in range(3)]
    config, public, clients, server = _setup(3, 2, 4)
    roster = server.collect_advertisements([c.advertise() for c in clients.values()])
    routed = server.route_shares([e for c in clients.values() for e in c.share_keys(roster, public)])
    with pytest.raises(ValueError, match="uint32"):
        clients[1].mask_input(inputs[0].astype(np.int64), routed[1])
    with pytest.raises(ValueError, match="length"):
        clients[1].mask_input(np.zeros(5, np.uint32), routed[1])
