"""Choice dynamics: the tiny-RNN phase portrait of each agent's action preference (protocol ``dynamics_v1``).

After Ji-An, Benna & Mattar (Nature 2025, "Discovering cognitive strategies with tiny recurrent neural networks"),
who plot an agent's preference (the logit of its choice) against the change that one trial's outcome makes to it, one
curve per outcome, and read its fixed points.

**Preference.** For agent a at step t, with policy p_t = softmax(logits_t) and chosen action c = action_t,

    L_t = log p_t(c) - log(1 - p_t(c)) = logit_t[c] - logsumexp_{j != c} logit_t[j]

(the log-odds of the chosen action against the three others, computed from the logits without forming p), and its
change under the next step's policy, *for the same action c*,

    dL_t = L_{t+1}(c) - L_t(c),   L_{t+1}(c) = logit_{t+1}[c] - logsumexp_{j != c} logit_{t+1}[j].

Pairs (L_t, dL_t) exist for t = 0 .. T-2 (the last step has no next policy).

**Events (a partition).** Each pair is labelled by what happened between the two policies, i.e. the transition
s_t -> s_{t+1} (rollout alignment: events at t describe s_t -> s_{t+1}, and logits at t+1 are computed from
s_{t+1}). Exactly one label per pair, by priority:

1. ``collision``: ``collision[t]`` (the shared flag: either agent stepped onto the other);
2. ``new_field``: otherwise, the agent's own ``{a}_new_field[t]`` (it entered a cell it had not visited);
3. ``visible``: otherwise, the partner is in the agent's physical field of view on s_{t+1} (``{a}_fov[t+1]``,
   Chebyshev distance <= 3);
4. ``invisible``: otherwise.

The order follows the reward table (collision > own new field > baseline; SPEC §2), so the first two labels are the
rewarded outcomes and the unrewarded steps are split by whether the partner is in view. ``fov`` is the physical field
of view: it is what the agent *observes* only under partial visibility (social); under ``none`` (non-social) the
partner is never shown and under ``full`` always, so there the visible/invisible split is a control (the rollout's
``visibility`` is an identity column of every row). A fifth label, ``all``, is the union of the four (every valid
pair), not a further part of the partition.

**Binning.** L is binned on a fixed grid of ``n_bins`` equal bins over [``l_min``, ``l_max``] (the same grid for every
rollout, so bins can be pooled across units); pairs with L outside the grid are counted (``n_out_of_range``) and left
out. Per (agent, event, bin): n, the mean L of its pairs (``l_mean``), the mean, sample SD (ddof 1) and SEM of dL.
The SEM treats the pairs as independent; successive steps of one episode are not, so it is optimistic.

**Fixed points.** Over the bins with at least ``min_count`` pairs, in order of L, every pair of consecutive bins whose
mean dL changes sign (``(m_i > 0) != (m_j > 0)``: an exact zero counts as non-positive) gives one fixed point by linear
interpolation between (l_mean_i, m_i) and (l_mean_j, m_j):

    L* = x_i - m_i (x_j - x_i) / (m_j - m_i),    slope = (m_j - m_i) / (x_j - x_i).

A negative slope is an attractor of the mean flow; as a map L -> L + f(L) it is stable for -2 < slope < 0
(``stable``), overshooting for slope <= -2, and a repeller for slope > 0. The points are the interpolation (l_mean,
not the bin centre) because E[dL | L in bin] = f(E[L | L in bin]) exactly when f is linear.

Caveats for reading the portraits: c is sampled from p_t, so L_t is selected upward and the sampling noise alone
pulls dL down at high L (regression to the mean): compare curves across events, tasks and architectures rather than
reading an absolute attractor as a learned strategy.

**Output** (docs/ARTIFACTS.md, "dynamics CSV"): the identity columns of every analysis CSV, then ``agent``,
``event``, ``kind`` and the columns of that kind:

- ``summary`` (one per agent x event): ``n`` (pairs in range), ``n_out_of_range``, ``l_mean``, ``delta_mean``,
  ``delta_sd``, ``delta_sem``, ``n_fixed_points``;
- ``bin`` (one per non-empty bin): ``bin``, ``l_lo``, ``l_hi``, ``l_centre``, ``l_mean``, ``delta_mean``, ``delta_sd``,
  ``delta_sem``, ``n``;
- ``fixed_point`` (one per sign change): ``fixed_point`` (0, 1, ... in order of L), ``l_star``, ``slope``, ``stable``,
  ``bin`` (the left bracketing bin), ``n`` (pairs in the two bracketing bins), ``n_fixed_points``.

Every row also carries ``min_count``. Cells that do not apply are empty. Valid (non-degenerate) episodes only; a
rollout with fewer than 3 valid episodes (``degenerate_unit``) gets its summary rows with every value empty.
"""

from __future__ import annotations

import numpy as np

from interbrain.errors import InterbrainError

PROTOCOL = "dynamics_v1"
SCHEMA_VERSION = 1
AGENTS = ("chaser", "explorer")
EVENTS = ("collision", "new_field", "visible", "invisible")  # the partition, in priority order
ALL = "all"
KINDS = ("summary", "bin", "fixed_point")
N_ACTIONS = 4
DEFAULTS = {"l_min": -10.0, "l_max": 10.0, "n_bins": 40, "min_count": 10}
VALUE_FIELDS = ("agent", "event", "kind", "bin", "l_lo", "l_hi", "l_centre", "l_mean", "delta_mean", "delta_sd",
                "delta_sem", "n", "n_out_of_range", "fixed_point", "l_star", "slope", "stable", "n_fixed_points",
                "min_count")


# ----------------------------------------------------------------------------------------------------------------
# preference and its change
# ----------------------------------------------------------------------------------------------------------------

def _check_logits_actions(logits, actions):
    logits = np.asarray(logits, dtype=np.float64)
    actions = np.asarray(actions)
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise InterbrainError(f"logits must have an action axis of size >= 2, got shape {logits.shape}")
    if actions.shape != logits.shape[:-1]:
        raise InterbrainError(f"actions have shape {actions.shape}, logits {logits.shape}: expected logits [..., A] "
                              f"and actions [...]")
    if not np.isfinite(logits).all():
        raise InterbrainError(f"logits contain {int((~np.isfinite(logits)).sum())} non-finite values")
    if actions.size and (actions.min() < 0 or actions.max() >= logits.shape[-1]):
        raise InterbrainError(f"actions hold ids outside 0..{logits.shape[-1] - 1}")
    return logits, actions.astype(np.int64)


def preference(logits, actions) -> np.ndarray:
    """L = log p(c) - log(1 - p(c)) of action ``actions`` under ``logits`` [..., A] (p = softmax), shape [...]."""
    logits, actions = _check_logits_actions(logits, actions)
    chosen = np.take_along_axis(logits, actions[..., None], -1)[..., 0]
    others = np.where(np.arange(logits.shape[-1]) == actions[..., None], -np.inf, logits)
    top = others.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(others - top).sum(-1))
    return chosen - lse


def preference_change(logits, actions) -> tuple[np.ndarray, np.ndarray]:
    """(L_t, dL_t) for t = 0 .. T-2 from ``logits`` [T, ..., A] and ``actions`` [T, ...] (see the module doc).

    dL_t = L_{t+1}(c_t) - L_t(c_t): the action chosen at t, evaluated under the next step's logits.
    """
    logits, actions = _check_logits_actions(logits, actions)
    if logits.ndim < 2 or logits.shape[0] < 2:
        raise InterbrainError(f"need at least 2 time steps, got logits of shape {logits.shape}")
    now = preference(logits[:-1], actions[:-1])
    nxt = preference(logits[1:], actions[:-1])
    return now, nxt - now


def transition_events(collision, fov, new_field) -> np.ndarray:
    """Event label (an index into ``EVENTS``) of each transition t -> t+1, t = 0 .. T-2: int8 [T-1, E].

    ``collision`` and ``new_field`` [T, E] describe s_t -> s_{t+1}; ``fov`` [T+1, E] is the partner in view on s_t,
    so the transition t -> t+1 uses ``fov[t+1]``. Priority: collision > new_field > visible > invisible.
    """
    collision = np.asarray(collision).astype(bool)
    new_field = np.asarray(new_field).astype(bool)
    fov = np.asarray(fov).astype(bool)
    if collision.ndim != 2 or new_field.shape != collision.shape:
        raise InterbrainError(f"collision {collision.shape} and new_field {new_field.shape} must both be [T, E]")
    T, E = collision.shape
    if fov.shape != (T + 1, E):
        raise InterbrainError(f"fov has shape {fov.shape}, expected {(T + 1, E)} (a state series s_0 .. s_T)")
    c, n, v = collision[:T - 1], new_field[:T - 1], fov[1:T]
    out = np.full((T - 1, E), EVENTS.index("invisible"), dtype=np.int8)
    out[v] = EVENTS.index("visible")
    out[n] = EVENTS.index("new_field")
    out[c] = EVENTS.index("collision")
    return out


# ----------------------------------------------------------------------------------------------------------------
# binned flow and fixed points
# ----------------------------------------------------------------------------------------------------------------

def bin_edges(l_min: float = DEFAULTS["l_min"], l_max: float = DEFAULTS["l_max"],
              n_bins: int = DEFAULTS["n_bins"]) -> np.ndarray:
    _check_grid(l_min, l_max, n_bins)
    return np.linspace(float(l_min), float(l_max), int(n_bins) + 1)


def _check_grid(l_min, l_max, n_bins):
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 2:
        raise InterbrainError(f"n_bins must be an integer >= 2, got {n_bins!r}")
    if not (np.isfinite(l_min) and np.isfinite(l_max)) or not l_min < l_max:
        raise InterbrainError(f"need finite l_min < l_max, got l_min={l_min!r}, l_max={l_max!r}")


def _sd(x: np.ndarray) -> float | None:
    return float(np.std(x, ddof=1)) if x.size >= 2 else None


def binned_flow(L, dL, edges) -> list[dict]:
    """Per non-empty bin of ``edges``: bin, l_lo, l_hi, l_centre, l_mean, delta_mean, delta_sd, delta_sem, n.

    Bins are [lo, hi) except the last, which includes ``edges[-1]``; L outside the grid is left out.
    """
    L = np.asarray(L, dtype=np.float64).ravel()
    dL = np.asarray(dL, dtype=np.float64).ravel()
    edges = np.asarray(edges, dtype=np.float64)
    if L.shape != dL.shape:
        raise InterbrainError(f"L {L.shape} and dL {dL.shape} differ in size")
    idx = np.searchsorted(edges, L, side="right") - 1
    idx[L == edges[-1]] = len(edges) - 2
    rows = []
    for b in np.unique(idx[(idx >= 0) & (idx < len(edges) - 1)]):
        sel = idx == b
        d = dL[sel]
        sd = _sd(d)
        rows.append({"bin": int(b), "l_lo": float(edges[b]), "l_hi": float(edges[b + 1]),
                     "l_centre": float(0.5 * (edges[b] + edges[b + 1])), "l_mean": float(L[sel].mean()),
                     "delta_mean": float(d.mean()), "delta_sd": sd,
                     "delta_sem": None if sd is None else sd / np.sqrt(d.size), "n": int(d.size)})
    return rows


def fixed_points(x, m, n=None, *, min_count: int = 1) -> list[dict]:
    """Zero crossings of a binned mean flow: bins (x = their mean L, m = their mean dL, n = counts) with n >=
    ``min_count``, sorted by x; each consecutive pair with a sign change gives {"l_star", "slope", "stable", "left",
    "right", "n"} (left/right: positions in the input; see the module doc for the interpolation and ``stable``)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    n = np.ones(x.shape, dtype=np.int64) if n is None else np.asarray(n)
    if not (x.shape == m.shape == n.shape) or x.ndim != 1:
        raise InterbrainError(f"x {x.shape}, m {m.shape} and n {n.shape} must be equal 1-d shapes")
    keep = np.flatnonzero((n >= min_count) & np.isfinite(x) & np.isfinite(m))
    keep = keep[np.argsort(x[keep], kind="stable")]
    out = []
    for i, j in zip(keep[:-1], keep[1:]):
        if (m[i] > 0) == (m[j] > 0) or x[j] == x[i]:
            continue
        slope = (m[j] - m[i]) / (x[j] - x[i])
        out.append({"l_star": float(x[i] - m[i] / slope), "slope": float(slope), "stable": bool(-2.0 < slope < 0.0),
                    "left": int(i), "right": int(j), "n": int(n[i] + n[j])})
    return out


# ----------------------------------------------------------------------------------------------------------------
# one rollout
# ----------------------------------------------------------------------------------------------------------------

def _get(data, key, shape=None):
    if key not in data:
        raise InterbrainError(f"rollout lacks tensor {key!r}")
    x = np.asarray(data[key])
    if shape is not None and x.shape != shape:
        raise InterbrainError(f"rollout tensor {key!r} has shape {x.shape}, expected {shape}")
    return x


def agent_pairs(data: dict, agent: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, dL, event index) [T-1, E] of one agent from a rollout's tensors (every episode; mask outside)."""
    if agent not in AGENTS:
        raise InterbrainError(f"unknown agent {agent!r}; expected one of {', '.join(AGENTS)}")
    collision = _get(data, "collision")
    if collision.ndim != 2:
        raise InterbrainError(f"rollout tensor 'collision' has shape {collision.shape}, expected (T, E)")
    T, E = collision.shape
    logits = _get(data, f"{agent}_logits", (T, E, N_ACTIONS))
    actions = _get(data, f"{agent}_action", (T, E))
    L, dL = preference_change(logits, actions)
    events = transition_events(collision, _get(data, f"{agent}_fov", (T + 1, E)),
                               _get(data, f"{agent}_new_field", (T, E)))
    return L, dL, events


def _flow_rows(L, dL, edges, min_count) -> list[dict]:
    """summary, bin and fixed_point rows (without agent/event) for one set of pairs."""
    in_range = (L >= edges[0]) & (L <= edges[-1])
    Li, di = L[in_range], dL[in_range]
    bins = binned_flow(Li, di, edges)
    fps = fixed_points([b["l_mean"] for b in bins], [b["delta_mean"] for b in bins], [b["n"] for b in bins],
                       min_count=min_count)
    sd = _sd(di)
    rows = [{"kind": "summary", "n": int(Li.size), "n_out_of_range": int(L.size - Li.size),
             "l_mean": float(Li.mean()) if Li.size else None, "delta_mean": float(di.mean()) if di.size else None,
             "delta_sd": sd, "delta_sem": None if sd is None else sd / np.sqrt(di.size),
             "n_fixed_points": len(fps)}]
    rows += [{"kind": "bin", **b} for b in bins]
    rows += [{"kind": "fixed_point", "fixed_point": k, "l_star": f["l_star"], "slope": f["slope"],
              "stable": f["stable"], "bin": bins[f["left"]]["bin"], "n": f["n"], "n_fixed_points": len(fps)}
             for k, f in enumerate(fps)]
    return rows


def dynamics_rollout(data: dict, *, l_min: float = DEFAULTS["l_min"], l_max: float = DEFAULTS["l_max"],
                     n_bins: int = DEFAULTS["n_bins"], min_count: int = DEFAULTS["min_count"],
                     valid=None) -> list[dict]:
    """Rows (agent, event, kind and their values; no identity) of one rollout's tensors.

    ``valid`` [E] selects episodes (default: ``~episode_degenerate`` when present, else all). Agents without
    ``{agent}_logits`` (a uniform-random opponent) are skipped; a rollout with neither agent's logits is an error.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise InterbrainError(f"min_count must be a positive integer, got {min_count!r}")
    edges = bin_edges(l_min, l_max, n_bins)
    agents = [a for a in AGENTS if f"{a}_logits" in data]
    if not agents:
        raise InterbrainError("rollout has no chaser_logits or explorer_logits")
    if valid is None:
        valid = ~np.asarray(data["episode_degenerate"]).astype(bool) if "episode_degenerate" in data else None
    rows = []
    for agent in agents:
        L, dL, ev = agent_pairs(data, agent)
        if valid is not None:
            valid = np.asarray(valid).astype(bool)
            if valid.shape != (L.shape[1],):
                raise InterbrainError(f"valid has shape {valid.shape}, expected ({L.shape[1]},)")
            L, dL, ev = L[:, valid], dL[:, valid], ev[:, valid]
        for k, event in enumerate(EVENTS + (ALL,)):
            sel = np.ones(L.shape, bool) if event == ALL else ev == k
            for r in _flow_rows(L[sel], dL[sel], edges, min_count):
                rows.append({"agent": agent, "event": event, **r, "min_count": int(min_count)})
    return rows


def fields() -> tuple[str, ...]:
    """Column order of the dynamics CSV: the identity columns, then ``VALUE_FIELDS``."""
    from interbrain.analysis.decoding import IDENTITY_FIELDS

    return tuple(IDENTITY_FIELDS) + VALUE_FIELDS


def _clean(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


def dynamics_file(rollout, out_csv, *, l_min: float = DEFAULTS["l_min"], l_max: float = DEFAULTS["l_max"],
                  n_bins: int = DEFAULTS["n_bins"], min_count: int = DEFAULTS["min_count"]):
    """The phase-portrait table of one analysis rollout (valid episodes only), written atomically; returns the path.

    A ``degenerate_unit`` rollout (fewer than 3 valid episodes) gets one empty ``summary`` row per agent x event.
    """
    from interbrain.io import write_csv_atomic
    from interbrain.rollout import load_rollout, rollout_identity

    _check_grid(l_min, l_max, n_bins)
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise InterbrainError(f"min_count must be a positive integer, got {min_count!r}")
    data, meta = load_rollout(rollout)
    ident = rollout_identity(rollout, data, meta, protocol=PROTOCOL, schema_version=SCHEMA_VERSION)
    if ident["status"] == "ok":
        values = dynamics_rollout(data, l_min=l_min, l_max=l_max, n_bins=n_bins, min_count=min_count)
    else:
        agents = [a for a in AGENTS if f"{a}_logits" in data] or list(AGENTS)
        values = [{"agent": a, "event": e, "kind": "summary", "min_count": int(min_count)}
                  for a in agents for e in EVENTS + (ALL,)]
    rows = [{**ident, **{k: _clean(v) for k, v in r.items()}} for r in values]
    return write_csv_atomic(out_csv, rows, list(fields()))


__all__ = ["preference", "preference_change", "transition_events", "bin_edges", "binned_flow", "fixed_points",
           "agent_pairs", "dynamics_rollout", "dynamics_file", "fields", "PROTOCOL", "SCHEMA_VERSION", "EVENTS",
           "AGENTS", "ALL", "KINDS", "VALUE_FIELDS", "DEFAULTS"]
