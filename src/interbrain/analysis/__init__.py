"""Neural analyses of SPEC §6 on the analysis rollouts of §5.3.

Modules (import them directly; this package imports none of them):

- ``plsc``: PLSC shared subspace and its circular-shift / episode-shuffle nulls (§6.2).
- ``subspace``: unique subspace (§6.3) and the perturbation bases of shared-subspace removal (§6.6).
- ``cka``: linear CKA across architectures and the balanced common probe (§6.4).
- ``decoding``, ``partner``, ``stats``: event decoding (§6.1), partner representation (§6.5), statistics (§6.7).
- ``dynamics``: choice dynamics, the tiny-RNN phase portrait of each agent's action preference and its fixed points
  (an extension; protocol ``dynamics_v1``).

Every function here takes plain numpy arrays (float32 or float64) and works on valid episodes only; the caller
masks degenerate episodes (§1.5, §5.4) or passes the episode mask where a function accepts one.
"""
