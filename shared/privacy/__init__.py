"""Privacy primitives for federated rounds; the round engine composes them.

* :mod:`shared.privacy.dp` -- client-level DP-FedAvg: joint L2 clipping,
  Gaussian noise (central or in per-site shares), adaptive clipping.
* :mod:`shared.privacy.accountant` -- (epsilon, delta) accounting via
  Google's ``dp-accounting`` RDP accountant, and the budget that stops
  training once it is spent.
* :mod:`shared.privacy.shamir` -- t-of-n secret sharing of byte strings.
* :mod:`shared.privacy.secagg` -- secure aggregation (Bonawitz et al. 2017)
  over uint32 fixed-point vectors, with dropout recovery.

Sample-level DP-SGD lives with the trainer in :mod:`edge_agent.dp_sgd`.

Nothing is re-exported here so that importing one primitive does not pull in
the others' dependencies (``dp-accounting`` imports SciPy).
"""
