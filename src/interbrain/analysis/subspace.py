"""Unique subspace (SPEC §6.3) and the bases of shared-subspace removal (SPEC §6.6, pitfalls 2 and 3).

All bases live in the chaser's *standardised* coordinates u = (h − μ)/σ (population std, σ < 1e-12 → 1), and
:func:`apply_removal` always standardises, projects and maps back (pitfall 2). Every control basis lies in the
orthogonal complement of the shared basis P, is rank-matched to it, and reports its removed variance (pitfall 3).

Random streams: ``np.random.SeedSequence(seed).spawn(2)`` gives one stream for ``random_orthogonal`` and one for the
per-unit shifts of ``paper_control``, so each condition is reproducible on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from interbrain.analysis.plsc import plsc_fit, shift_range, zscore
from interbrain.errors import InterbrainError

CONDITIONS = ("baseline", "shared_removed", "random_orthogonal", "top_unique_removed", "paper_control", "shared_only")
VARIANCE_MATCHED = "paper_control_variance_matched"
_ORTHO_TOL = 1e-6  # accepted deviation from orthonormality of a caller-supplied basis
_DEPENDENT = 1e-8  # relative residual norm below which a candidate direction is treated as dependent


def _check_orthonormal(B: np.ndarray, name: str) -> None:
    if B.shape[1] and np.abs(B.T @ B - np.eye(B.shape[1])).max() > _ORTHO_TOL:
        raise InterbrainError(f"{name} must have orthonormal columns")


def _complement(P: np.ndarray) -> np.ndarray:
    """Orthonormal basis [D, D − k] of the orthogonal complement of orthonormal P [D, k]."""
    if P.shape[1] == 0:
        return np.eye(P.shape[0])
    Q, _ = np.linalg.qr(P, mode="complete")
    return Q[:, P.shape[1] :]


def _fix_signs(B: np.ndarray) -> np.ndarray:
    """Largest-|·| entry of every column positive (a deterministic sign convention)."""
    if B.shape[1] == 0:
        return B
    sign = np.sign(B[np.abs(B).argmax(axis=0), np.arange(B.shape[1])])
    sign[sign == 0] = 1.0
    return B * sign


def _pca(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Principal axes [p, p] (descending) and their variances (ddof 1) of the rows of Z."""
    Z = Z - Z.mean(axis=0)
    lam, vec = np.linalg.eigh(Z.T @ Z / (Z.shape[0] - 1))
    return vec[:, ::-1], np.clip(lam[::-1], 0.0, None)


def unique_subspace(Xz, U_shared_k) -> tuple[np.ndarray, np.ndarray]:
    """Unique dimensions: PCA of the z-scored data inside the complement of the first k* shared loadings (§6.3).

    ``Xz`` [n, D] is z-scored activity, ``U_shared_k`` [D, k] orthonormal shared loadings (k may be 0). Returns
    ``pcs`` [D, D − k] (orthonormal, orthogonal to U_shared_k, by descending variance) and ``explained`` [D − k]: the
    variance along each PC as a fraction of the total variance of ``Xz`` (so shared plus unique sums to 1).
    """
    Xz = np.asarray(Xz, dtype=np.float64)
    U = np.asarray(U_shared_k, dtype=np.float64)
    if Xz.ndim != 2 or U.ndim != 2 or U.shape[0] != Xz.shape[1]:
        raise InterbrainError(f"unique_subspace needs Xz [n, D] and U_shared_k [D, k], got {Xz.shape} and {U.shape}")
    if Xz.shape[0] < 2:
        raise InterbrainError(f"unique_subspace needs at least 2 samples, got {Xz.shape[0]}")
    _check_orthonormal(U, "U_shared_k")
    B = _complement(U)
    vec, lam = _pca(Xz @ B)
    total = float(Xz.var(axis=0, ddof=1).sum())
    explained = lam / total if total > 0 else np.zeros_like(lam)
    return _fix_signs(B @ vec), explained


def _orthonormal_sequence(C: np.ndarray, P: np.ndarray, n_max: int) -> np.ndarray:
    """Gram–Schmidt of the columns of C (in order) inside the complement of P; dependent columns are skipped.

    Column j of the result spans the part of candidate j not already covered, so every prefix is a valid basis.
    """
    out: list[np.ndarray] = []
    for j in range(C.shape[1]):
        v = C[:, j].copy()
        ref = np.linalg.norm(v)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            v -= P @ (P.T @ v)
            if out:
                Qs = np.stack(out, axis=1)
                v -= Qs @ (Qs.T @ v)
        norm = np.linalg.norm(v)
        if ref > 0 and norm > _DEPENDENT * ref:
            out.append(v / norm)
            if len(out) == n_max:
                break
    return np.stack(out, axis=1) if out else np.zeros((C.shape[0], 0))


def random_complement_basis(P, rank: int, rng) -> np.ndarray:
    """A random orthonormal rank-``rank`` basis [D, rank] inside the orthogonal complement of orthonormal P [D, k].

    Gaussian directions, projected out of P and Gram–Schmidt orthonormalised (SPEC §6.3 ``random_unique`` and the
    §6.6 ``random_orthogonal`` control). ``rng`` is a seed or a ``np.random.Generator``.
    """
    P = np.asarray(P, dtype=np.float64)
    _check_orthonormal(P, "P")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank <= P.shape[0] - P.shape[1]:
        raise InterbrainError(f"rank must be an integer in [0, {P.shape[0] - P.shape[1]}], got {rank!r}")
    rng = np.random.default_rng(rng)
    Q = _orthonormal_sequence(rng.standard_normal((P.shape[0], rank)), P, rank)
    if Q.shape[1] != rank:  # a Gaussian draw is dependent with probability 0; never return a short basis
        raise InterbrainError(f"random complement basis came out with rank {Q.shape[1]} < {rank}")
    return _fix_signs(Q)


def _circular_shift_units(Z: np.ndarray, lengths, min_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each unit shifted by its own circular shift inside each episode (PLSC shift range), independently."""
    out = np.empty_like(Z)
    start = 0
    for length in lengths:
        lo, hi = shift_range(length, min_shift)
        block = Z[start : start + length]
        shifts = rng.integers(lo, hi + 1, size=Z.shape[1])
        idx = (np.arange(length)[:, None] - shifts[None, :]) % length  # out[t, j] = block[t − s_j, j]
        out[start : start + length] = np.take_along_axis(block, idx, axis=0)
        start += length
    return out


@dataclass
class PerturbationBases:
    """Shared-subspace removal bases of one unit (SPEC §6.6), in the chaser's standardised coordinates.

    ``bases[cond]`` is Q [D, r] (orthonormal), applied by :func:`apply_removal` with ``keep[cond]``.
    ``removed_variance[cond]`` = tr(QᵀΣ_uQ)/tr(Σ_u) on the fitting data for removal, and 1 − tr(PᵀΣ_uP)/tr(Σ_u) for
    ``shared_only`` (keep: everything outside P is removed); 0 for ``baseline``.
    """

    mu: np.ndarray
    sigma: np.ndarray
    P: np.ndarray
    bases: dict[str, np.ndarray]
    keep: dict[str, bool]
    removed_variance: dict[str, float]
    k: int
    seed: int
    paper_rank: int
    min_shift: int
    n_samples: int
    variance_matched_rank: int | None = None
    shared_S: np.ndarray = field(default=None, repr=False)

    def apply(self, h, condition: str):
        """:func:`apply_removal` with this condition's basis and keep flag."""
        if condition not in self.bases:
            raise InterbrainError(
                f"unknown perturbation condition {condition!r}; expected one of {', '.join(self.bases)}"
            )
        return apply_removal(h, self.mu, self.sigma, self.bases[condition], keep=self.keep[condition])

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Flat dict of arrays (safetensors-ready) from which :meth:`from_tensors` rebuilds the object."""
        out = {"mu": self.mu, "sigma": self.sigma, "P": self.P, "shared_S": self.shared_S}
        for cond, Q in self.bases.items():
            out[f"basis.{cond}"] = Q
            out[f"keep.{cond}"] = np.array([self.keep[cond]])
            out[f"removed_variance.{cond}"] = np.array([self.removed_variance[cond]], dtype=np.float64)
        for name in ("k", "seed", "paper_rank", "min_shift", "n_samples"):
            out[f"param.{name}"] = np.array([getattr(self, name)], dtype=np.int64)
        vm = -1 if self.variance_matched_rank is None else self.variance_matched_rank
        out["param.variance_matched_rank"] = np.array([vm], dtype=np.int64)
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    def metadata(self) -> dict:
        """JSON-able summary (conditions, ranks, keep flags, removed variance, parameters)."""
        return {
            "conditions": list(self.bases),
            "rank": {c: int(Q.shape[1]) for c, Q in self.bases.items()},
            "keep": dict(self.keep),
            "removed_variance": {c: float(v) for c, v in self.removed_variance.items()},
            "k": self.k,
            "seed": self.seed,
            "paper_rank": self.paper_rank,
            "min_shift": self.min_shift,
            "n_samples": self.n_samples,
            "variance_matched_rank": self.variance_matched_rank,
            "coordinates": "standardised: u = (h - mu) / sigma, population std, sigma < 1e-12 -> 1",
        }

    @classmethod
    def from_tensors(cls, tensors: dict) -> "PerturbationBases":
        try:
            order = CONDITIONS + (VARIANCE_MATCHED,)
            conds = [k[len("basis.") :] for k in tensors if k.startswith("basis.")]
            unknown = sorted(set(conds) - set(order))
            if unknown:
                raise InterbrainError(f"perturbation bases tensors hold unknown condition(s) {unknown}")
            conds.sort(key=order.index)  # safetensors stores keys sorted; restore the canonical order
            params = {
                key[len("param.") :]: int(np.asarray(value).reshape(-1)[0])
                for key, value in tensors.items()
                if key.startswith("param.")
            }
            vm = params.pop("variance_matched_rank")
            return cls(
                mu=np.asarray(tensors["mu"]),
                sigma=np.asarray(tensors["sigma"]),
                P=np.asarray(tensors["P"]),
                shared_S=np.asarray(tensors["shared_S"]),
                bases={c: np.asarray(tensors[f"basis.{c}"]) for c in conds},
                keep={c: bool(np.asarray(tensors[f"keep.{c}"]).reshape(-1)[0]) for c in conds},
                removed_variance={c: float(np.asarray(tensors[f"removed_variance.{c}"]).reshape(-1)[0]) for c in conds},
                variance_matched_rank=None if vm < 0 else vm,
                **params,
            )
        except KeyError as exc:
            raise InterbrainError(f"perturbation bases tensors lack entry {exc.args[0]!r}") from None


def perturbation_bases(
    X,
    Y,
    k: int = 10,
    seed: int = 0,
    paper_rank: int = 25,
    episode_lengths=None,
    *,
    min_shift: int = 31,
    variance_matched: bool = False,
) -> PerturbationBases:
    """Bases for every SPEC §6.6 condition from pooled valid chaser ``X`` and explorer ``Y`` hidden states [N, D].

    P is the top-``k`` chaser loadings of a pooled PLSC fit (standardised coordinates). ``episode_lengths`` (summing
    to N; default one episode of N steps) bounds the within-episode circular shifts of ``paper_control``, drawn per
    unit and episode from :func:`interbrain.analysis.plsc.shift_range` (``min_shift``). ``variance_matched`` adds
    ``paper_control_variance_matched``: the prefix (rank 1 … D − k) of the complement-projected, re-orthonormalised
    temporally shifted PCs whose removed variance is closest to that of ``shared_removed``. When the whole complement
    holds less variance than P the match is the full complement; compare the two ``removed_variance`` entries.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise InterbrainError(
            f"perturbation_bases needs X [N, D] and Y [N, D'] with equal N, got {X.shape} and {Y.shape}"
        )
    N, D = X.shape
    for name, value, hi in (("k", k, min(D, Y.shape[1])), ("paper_rank", paper_rank, D)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= hi:
            raise InterbrainError(f"{name} must be an integer in [1, {hi}], got {value!r}")
    if k + paper_rank > D:
        raise InterbrainError(f"paper_rank={paper_rank} does not fit the complement of k={k} shared dims in {D} units")
    lengths = [N] if episode_lengths is None else [int(n) for n in episode_lengths]
    if sum(lengths) != N or min(lengths) <= 0:
        raise InterbrainError(f"episode_lengths must be positive and sum to {N} samples, got sum {sum(lengths)}")

    fit = plsc_fit(X, Y)
    mu, sigma = fit.mean_x, fit.scale_x
    P = fit.U[:, :k].copy()
    Xz = (X - mu) / sigma
    cov = np.cov(Xz, rowvar=False)
    total = float(np.trace(cov))

    def removed(Q: np.ndarray) -> float:
        return float(np.trace(Q.T @ cov @ Q) / total) if total > 0 else 0.0

    rng_random, rng_shift = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    random_orth = random_complement_basis(P, k, rng_random)
    top_unique = unique_subspace(Xz, P)[0][:, :k]

    shifted, _, _ = zscore(_circular_shift_units(Xz, lengths, min_shift, rng_shift))
    shifted_pcs, _ = _pca(shifted)
    n_candidates = D - k if variance_matched else paper_rank
    sequence = _orthonormal_sequence(shifted_pcs, P, n_candidates)
    if sequence.shape[1] < paper_rank:
        raise InterbrainError(f"temporally shifted PCs span only {sequence.shape[1]} dims outside P, need {paper_rank}")

    bases = {
        "baseline": np.zeros((D, 0)),
        "shared_removed": P,
        "random_orthogonal": random_orth,
        "top_unique_removed": top_unique,
        "paper_control": sequence[:, :paper_rank],
        "shared_only": P,
    }
    keep = {c: c == "shared_only" for c in bases}
    removed_variance = {c: removed(Q) for c, Q in bases.items()}
    removed_variance["shared_only"] = 1.0 - removed(P)
    matched_rank = None
    if variance_matched:
        per_dim = np.einsum("di,de,ei->i", sequence, cov, sequence) / total
        cumulative = np.cumsum(per_dim)
        matched_rank = int(np.argmin(np.abs(cumulative - removed_variance["shared_removed"]))) + 1
        bases[VARIANCE_MATCHED] = sequence[:, :matched_rank]
        keep[VARIANCE_MATCHED] = False
        removed_variance[VARIANCE_MATCHED] = removed(bases[VARIANCE_MATCHED])
    return PerturbationBases(
        mu=mu,
        sigma=sigma,
        P=P,
        bases={c: np.ascontiguousarray(Q) for c, Q in bases.items()},
        keep=keep,
        removed_variance=removed_variance,
        k=int(k),
        seed=int(seed),
        paper_rank=int(paper_rank),
        min_shift=int(min_shift),
        n_samples=int(N),
        variance_matched_rank=matched_rank,
        shared_S=fit.S[:k].copy(),
    )


def apply_removal(h, mu, sigma, Q, keep: bool = False):
    """Standardise, project, map back (SPEC §6.6): u = (h − μ)/σ; u′ = u − QQᵀu (keep: QQᵀu); h′ = μ + σ ⊙ u′.

    ``h`` is a numpy array or torch tensor [..., D]; ``mu``, ``sigma`` [D] and ``Q`` [D, r] may be either. The result
    has h's type, dtype and device. Removal is computed as h − σ ⊙ QQᵀu (algebraically equal), so an empty Q returns
    h unchanged.
    """
    shape_q = tuple(Q.shape)
    if len(shape_q) != 2 or tuple(mu.shape) != shape_q[:1] or tuple(sigma.shape) != shape_q[:1]:
        raise InterbrainError(
            f"apply_removal needs mu [D], sigma [D] and Q [D, r]; "
            f"got {tuple(mu.shape)}, {tuple(sigma.shape)}, {shape_q}"
        )
    if h.shape[-1] != shape_q[0]:
        raise InterbrainError(f"hidden state has {h.shape[-1]} units but the basis has {shape_q[0]}")
    if isinstance(h, torch.Tensor):
        mu, sigma, Q = (torch.as_tensor(a, dtype=h.dtype, device=h.device) for a in (mu, sigma, Q))
    else:
        h = np.asarray(h)
        dtype = h.dtype if np.issubdtype(h.dtype, np.floating) else np.float64
        mu, sigma, Q = (
            np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=dtype) for a in (mu, sigma, Q)
        )
    u = (h - mu) / sigma
    proj = (u @ Q) @ Q.T
    return mu + sigma * proj if keep else h - sigma * proj
