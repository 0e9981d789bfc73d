"""Partner representation in the neural action space: non-redundant variance (SPEC §6.5).

The response is z_t = W_a^T W_a h_t (mean-centred), where W_a [4, 256] is the policy readout. It is
regressed on predictor groups at step t by full-rank least squares with an intercept (a full-rank PLS
regression, as in the official ``computeNonRedundantVar``, is the same fit). R^2 = 1 - SSE/SST summed
over all z dimensions.

For each group g and each of ``n_shifts`` repeats, the group's block alone is circularly shifted in
time, the model is refitted (R2_g), and its chance level is the mean R^2 over ``n_shifts`` circular
shifts of that whole (group-shifted) design relative to z. The full model's chance is the mean R^2
over ``n_shifts`` shifts of the whole unshifted design. Then

    contribution_g (%) = 100 * ((R2_full - chance_full) - mean_repeats(R2_g - chance_g)).

"partner" shifts the partner groups together as one block (one shift for all of them).

**Shifts.** Uniform integers in [min_shift, T - min_shift + 1] (SPEC §6.2: [31, T-30] for the official
``tempShift(., 60)``), drawn independently for every episode and applied within that episode, so no
sample is moved across an episode boundary. All shifts come from one ``numpy`` generator seeded with
``seed``.
"""

from __future__ import annotations

import contextlib

import numpy as np
from threadpoolctl import threadpool_limits

from interbrain.errors import InterbrainError, check_choice

GRID = 10  # SPEC §1.1: 10 x 10 cells, rows and columns 0..9
PARTNER_GROUPS = ("partner_position", "partner_action", "partner_behaviour")
GROUPS = ("collision", "self_position", "partner_position", "self_action", "partner_action",
          "self_behaviour", "partner_behaviour")
#: Behaviour labels per agent (SPEC §1.2, §5.3): the chaser's and the explorer's own events.
BEHAVIOURS = {
    "chaser": ("chaser_new_field", "chaser_approach"),
    "explorer": ("explorer_new_field", "explorer_escape", "explorer_escape_close", "explorer_escape_near",
                 "explorer_escape_far"),
}
ROLES = ("chaser", "explorer")
_EIG_FLOOR = 1e-12


def neural_action_space(hidden, action_weight) -> np.ndarray:
    """z = W_a^T W_a h for every h in ``hidden`` [..., H] (W_a: [4, H]), centred over all leading axes."""
    hidden = np.asarray(hidden, dtype=np.float64)
    weight = np.asarray(action_weight, dtype=np.float64)
    if weight.ndim != 2 or hidden.ndim < 1 or weight.shape[1] != hidden.shape[-1]:
        raise InterbrainError(f"action_weight {weight.shape} does not match hidden {hidden.shape} ([4, H] vs [..., H])")
    if not np.isfinite(hidden).all():
        raise InterbrainError(f"hidden contains {int((~np.isfinite(hidden)).sum())} non-finite values")
    z = (hidden @ weight.T) @ weight
    return z - z.reshape(-1, z.shape[-1]).mean(0)


def _tensor(rollout, key, shape):
    if key not in rollout:
        raise InterbrainError(f"rollout lacks tensor {key!r}")
    x = np.asarray(rollout[key])
    if x.shape != shape:
        raise InterbrainError(f"rollout tensor {key!r} has shape {x.shape}, expected {shape}")
    return x


def _one_hot(actions, key):
    bad = (actions < 0) | (actions > 3)
    if bad.any():
        raise InterbrainError(f"{key} holds action ids outside 0..3, e.g. {int(actions[bad][0])}")
    return np.eye(4)[actions.astype(np.int64)]


def build_predictors(rollout: dict, role: str = "chaser") -> dict[str, np.ndarray]:
    """Predictor groups at step t (SPEC §6.5) from a §5.3 rollout: group name -> [T, E, k] float64.

    collision [1]; self_position, partner_position [2] (row, col of state s_t, divided by 9 so they lie in
    [0, 1]); self_action, partner_action [4] (one-hot, SPEC action order); self_behaviour and
    partner_behaviour (chaser: new field, approach; explorer: new field, escape, escape close/near/far).
    ``role`` is the agent whose z is explained ("chaser" by default). Nothing is masked here: select the
    valid episodes (``~episode_degenerate``) on the E axis of z and of every group before fitting.
    """
    check_choice("role", role, ROLES)
    partner = "explorer" if role == "chaser" else "chaser"
    if "collision" not in rollout:
        raise InterbrainError("rollout lacks tensor 'collision'")
    collision = np.asarray(rollout["collision"])
    if collision.ndim != 2:
        raise InterbrainError(f"rollout tensor 'collision' has shape {collision.shape}, expected (T, E)")
    T, E = collision.shape

    def position(agent):
        return _tensor(rollout, f"{agent}_pos", (T + 1, E, 2))[:T].astype(np.float64) / (GRID - 1)

    def action(agent):
        key = f"{agent}_action"
        return _one_hot(_tensor(rollout, key, (T, E)), key)

    def behaviour(agent):
        return np.stack([_tensor(rollout, k, (T, E)).astype(np.float64) for k in BEHAVIOURS[agent]], axis=-1)

    for agent in ROLES:
        pos = _tensor(rollout, f"{agent}_pos", (T + 1, E, 2))
        if pos.min() < 0 or pos.max() > GRID - 1:
            raise InterbrainError(f"{agent}_pos holds cells outside 0..{GRID - 1}")
    return {
        "collision": collision.astype(np.float64)[..., None],
        "self_position": position(role),
        "partner_position": position(partner),
        "self_action": action(role),
        "partner_action": action(partner),
        "self_behaviour": behaviour(role),
        "partner_behaviour": behaviour(partner),
    }


def _response(z2d: np.ndarray) -> tuple[np.ndarray, float]:
    """Centred z in its principal coordinates, and its total sum of squares SST.

    A least-squares fit sees z only through its column space, so the principal coordinates give the
    same explained sum of squares with fewer columns (z = W^T W h has rank <= 4). Components with
    variance below 1e-12 of the largest are dropped.
    """
    zc = z2d - z2d.mean(0)
    sst = float(np.sum(zc * zc))
    if sst <= 0:
        raise InterbrainError("z has zero variance; R^2 is undefined")
    evals, evecs = np.linalg.eigh(zc.T @ zc)
    return zc @ evecs[:, evals > evals.max() * 1e-12], sst


class _Fit:
    """Least-squares fit (with intercept) of responses on one design [N, k].

    The explained sum of squares of a centred response y is ||A^T y||^2 with A = X_c V L^{-1/2}, the
    whitened column space of the centred design (from the k x k Gram matrix; eigen-directions below
    1e-10 of the largest are exact collinearities, e.g. a full one-hot beside the intercept, and dropped,
    as are directions below an absolute 1e-12: constant columns, such as an event that never occurs).
    """

    def __init__(self, design2d: np.ndarray):
        xc = design2d - design2d.mean(0)
        evals, evecs = np.linalg.eigh(xc.T @ xc)
        keep = evals > max(evals.max() * 1e-10, _EIG_FLOOR)
        self.basis = xc @ (evecs[:, keep] / np.sqrt(evals[keep]))

    def r2(self, response: np.ndarray, sst: float) -> float:
        coords = self.basis.T @ response
        return float(np.sum(coords * coords)) / sst


def r_squared(z, design) -> float:
    """R^2 = 1 - SSE/SST (summed over z's columns) of the least-squares fit of z [N, q] on design [N, k] + intercept."""
    z = np.asarray(z, dtype=np.float64)
    design = np.asarray(design, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if design.ndim == 1:
        design = design[:, None]
    if design.shape[0] != z.shape[0]:
        raise InterbrainError(f"design has {design.shape[0]} rows but z has {z.shape[0]}")
    response, sst = _response(z)
    return _Fit(design).r2(response, sst)


def _shift(block, shifts):
    """Circularly shift block [T, E, k] along time, episode e by shifts[e] (out[t] = block[t - s])."""
    T = block.shape[0]
    t_idx = (np.arange(T)[:, None] - shifts[None, :]) % T
    return block[t_idx, np.arange(block.shape[1])[None, :]]


def _contributions(z, full, targets, n_shifts, min_shift, seed):
    """The fits of :func:`non_redundant_variance`; ``targets`` maps a name to the design columns it shifts."""
    T, E = z.shape[:2]
    rng = np.random.default_rng(seed)
    response, sst = _response(z.reshape(T * E, -1))
    response = response.reshape(T, E, -1)

    def draw():
        return rng.integers(min_shift, T - min_shift + 2, size=E)

    def fits(design):
        """R^2 of ``design`` and its chance level: the mean R^2 over n_shifts shifts of the whole design.

        Shifting every design column by s within an episode leaves the design's Gram matrix unchanged, so
        it equals shifting z by -s against the fixed design: one factorisation serves all chance fits.
        """
        fit = _Fit(design.reshape(T * E, -1))
        chance = [fit.r2(_shift(response, -draw()).reshape(T * E, -1), sst) for _ in range(n_shifts)]
        return fit.r2(response.reshape(T * E, -1), sst), float(np.mean(chance))

    r2_full, chance_full = fits(full)
    r2_shifted, chance_shifted, contributions = {}, {}, {}
    for name, c in targets.items():
        vals, chances = [], []
        for _ in range(n_shifts):
            design = full.copy()
            design[..., c] = _shift(full[..., c], draw())
            value, chance = fits(design)
            vals.append(value)
            chances.append(chance)
        r2_shifted[name] = float(np.mean(vals))
        chance_shifted[name] = float(np.mean(chances))
        contributions[name] = 100.0 * ((r2_full - chance_full) - float(np.mean(np.subtract(vals, chances))))
    return r2_full, chance_full, r2_shifted, chance_shifted, contributions


def non_redundant_variance(z, groups: dict, *, n_shifts: int = 10, min_shift: int = 31, seed: int = 0,
                           joint=PARTNER_GROUPS, threads: int | None = 1) -> dict:
    """Non-redundant variance of z explained by each predictor group, in % (SPEC §6.5; see module doc).

    z [T, E, q]; groups: name -> [T, E, k]. ``joint``: the groups shifted together for the "partner"
    entry (empty to skip it). Returns ``{"contributions": {group: %}, "partner": % or None, "r2_full",
    "chance_full", "r2_shifted": {name: mean R2_g}, "chance_shifted": {name: mean chance_g}, ...}``.
    ``threads``: BLAS threads during the fits (None: unchanged). The ~900 fits are small matrix
    products, for which a multi-threaded BLAS on a shared CPU mostly waits (1 thread was ~6x faster
    on the loaded 2-core development machine).
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 3:
        raise InterbrainError(f"z must be [T, E, q], got shape {z.shape}")
    T, E, _ = z.shape
    if isinstance(n_shifts, bool) or not isinstance(n_shifts, (int, np.integer)) or n_shifts < 1:
        raise InterbrainError(f"n_shifts must be a positive integer, got {n_shifts!r}")
    if isinstance(min_shift, bool) or not isinstance(min_shift, (int, np.integer)) or min_shift < 1:
        raise InterbrainError(f"min_shift must be a positive integer, got {min_shift!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise InterbrainError(f"threads must be a positive integer or None, got {threads!r}")
    if T - min_shift + 1 < min_shift:
        raise InterbrainError(f"min_shift={min_shift} leaves no shift in [{min_shift}, {T - min_shift + 1}] for T={T}")
    if not groups:
        raise InterbrainError("groups is empty")
    names = list(groups)
    blocks = []
    for name in names:
        b = np.asarray(groups[name], dtype=np.float64)
        if b.ndim != 3 or b.shape[:2] != (T, E):
            raise InterbrainError(f"group {name!r} has shape {b.shape}, expected ({T}, {E}, k)")
        if not np.isfinite(b).all():
            raise InterbrainError(f"group {name!r} contains non-finite values")
        blocks.append(b)
    joint = tuple(joint or ())
    for name in joint:
        if name not in groups:
            raise InterbrainError(f"joint group {name!r} is not among the groups ({', '.join(names)})")
    if not np.isfinite(z).all():
        raise InterbrainError("z contains non-finite values")

    widths = [b.shape[-1] for b in blocks]
    starts = np.concatenate([[0], np.cumsum(widths)])
    full = np.concatenate(blocks, axis=-1)
    cols = {name: np.arange(starts[i], starts[i + 1]) for i, name in enumerate(names)}
    targets = {name: cols[name] for name in names}
    if joint:
        targets["partner"] = np.concatenate([cols[name] for name in joint])

    with contextlib.nullcontext() if threads is None else threadpool_limits(limits=threads, user_api="blas"):
        r2_full, chance_full, r2_shifted, chance_shifted, contributions = _contributions(
            z, full, targets, n_shifts, min_shift, seed)
    partner = contributions.pop("partner", None)
    return {"contributions": contributions, "partner": partner, "r2_full": r2_full, "chance_full": chance_full,
            "r2_shifted": r2_shifted, "chance_shifted": chance_shifted, "n_shifts": int(n_shifts),
            "min_shift": int(min_shift), "n_samples": int(T * E), "groups": names, "joint": list(joint)}


PARTNER_PROTOCOL = "partner_v1"
MAX_ABS_HIDDEN = 1e6  # SPEC §6.5: a checkpoint whose hidden exceeds this (or is non-finite) is skipped


def partner_file(rollout, out_csv, *, n_shifts: int = 10, seed: int = 0):
    """Chaser partner representation (SPEC §6.5) of one analysis rollout, one CSV row (docs/ARTIFACTS.md).

    z = W_a^T W_a h uses the chaser's action-head weight stored in the rollout's metadata; valid episodes only.
    """
    from interbrain.io import write_csv_atomic
    from interbrain.rollout import load_rollout, rollout_identity

    data, meta = load_rollout(rollout)
    ident = rollout_identity(rollout, data, meta, protocol=PARTNER_PROTOCOL)
    hidden = data["chaser_hidden"]
    if ident["status"] == "ok" and (not np.isfinite(hidden).all() or np.abs(hidden).max() > MAX_ABS_HIDDEN):
        ident.update(status="skipped", reason=f"hidden non-finite or |h| > {MAX_ABS_HIDDEN:g}")
    row = dict(ident)
    if ident["status"] == "ok":
        valid = ~data["episode_degenerate"].astype(bool)
        w = np.asarray(meta["action_head_weight"]["chaser"], dtype=np.float64)
        z = neural_action_space(hidden[:, valid], w)
        sub = {k: (v[:, valid] if v.ndim >= 2 and v.shape[1] == valid.size else v) for k, v in data.items()}
        res = non_redundant_variance(z, build_predictors(sub, "chaser"), n_shifts=n_shifts, seed=seed)
        row.update(partner=res["partner"], r2_full=res["r2_full"], chance_full=res["chance_full"], n_shifts=n_shifts,
                   **{f"contribution_{g}": v for g, v in res["contributions"].items()})
    from interbrain.analysis.decoding import IDENTITY_FIELDS

    fields = list(IDENTITY_FIELDS) + ["partner", "r2_full", "chance_full", "n_shifts"] + [
        f"contribution_{g}" for g in GROUPS]
    return write_csv_atomic(out_csv, [row], fields)
