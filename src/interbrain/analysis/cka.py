"""Linear CKA across architectures on a common probe (SPEC §6.4, pitfall 9).

CKA(X, Y) = ‖XᵀY‖_F² / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred X (n × p) and Y (n × q), the biased form; 0 if the
denominator is 0. The matrix over architectures uses every seed pair across architectures (A ≠ B) and the i ≠ j
pairs within an architecture, so the diagonal is a cross-seed ceiling rather than a trivial 1.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from interbrain.errors import InterbrainError


def _centred(X, name: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise InterbrainError(f"{name} must be a numeric [n, features] array, got shape {X.shape}")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise InterbrainError(f"{name} contains NaN or Inf")
    return X - X.mean(axis=0)


def _cka_centred(X: np.ndarray, Y: np.ndarray, norm_x: float, norm_y: float) -> float:
    den = norm_x * norm_y
    if den == 0:
        return 0.0
    return float(np.square(X.T @ Y).sum() / den)


def linear_cka(X, Y) -> float:
    """Biased linear CKA of X [n, p] and Y [n, q] (columns centred here); 0 if either is constant."""
    X = _centred(X, "X")
    Y = _centred(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise InterbrainError(f"CKA needs the same samples in X and Y, got {X.shape[0]} and {Y.shape[0]} rows")
    return _cka_centred(X, Y, np.linalg.norm(X.T @ X), np.linalg.norm(Y.T @ Y))


def cka_matrix(features: dict) -> dict:
    """Mean and sample SD of CKA between architectures over seed pairs (SPEC §6.4).

    ``features`` maps ``(arch, seed)`` to that network's states on the common probe, [n, units], same n for all.
    Returns ``{"archs": [...], "mean": [A, A], "sd": [A, A], "n_pairs": [A, A]}`` with architectures in order of first
    appearance. Off-diagonal cells use all seed pairs (n_A × n_B); diagonal cells the unordered pairs i ≠ j within the
    architecture (nan with one seed). SD is ddof 1 (nan for fewer than 2 pairs).
    """
    if not features:
        raise InterbrainError("cka_matrix needs at least one (arch, seed) feature matrix")
    archs: list[str] = []
    for key in features:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise InterbrainError(f"cka_matrix keys must be (arch, seed) tuples, got {key!r}")
        if key[0] not in archs:
            archs.append(key[0])
    keys = list(features)
    cent = {k: _centred(features[k], f"features[{k!r}]") for k in keys}
    n_rows = {v.shape[0] for v in cent.values()}
    if len(n_rows) != 1:
        raise InterbrainError(f"all feature matrices must cover the same probe, got row counts {sorted(n_rows)}")
    # float32 cross products (n·p·q per pair dominates), one GEMM per network against all later ones; sums in float64
    stacked = torch.from_numpy(np.concatenate([cent[k] for k in keys], axis=1).astype(np.float32))
    offsets = np.cumsum([0] + [cent[k].shape[1] for k in keys])
    norms = [float(np.linalg.norm(cent[k].T @ cent[k])) for k in keys]

    values: dict[tuple[int, int], list[float]] = {}
    for i, ki in enumerate(keys[:-1]):
        cross = (stacked[:, offsets[i] : offsets[i + 1]].T @ stacked[:, offsets[i + 1] :]).double().square_()
        for j in range(i + 1, len(keys)):
            kj = keys[j]
            num = float(cross[:, offsets[j] - offsets[i + 1] : offsets[j + 1] - offsets[i + 1]].sum())
            den = norms[i] * norms[j]
            a, b = archs.index(ki[0]), archs.index(kj[0])
            values.setdefault((min(a, b), max(a, b)), []).append(num / den if den else 0.0)
    A = len(archs)
    mean = np.full((A, A), np.nan)
    sd = np.full((A, A), np.nan)
    n_pairs = np.zeros((A, A), dtype=np.int64)
    for (a, b), vals in values.items():
        v = np.asarray(vals)
        for x, y in ((a, b), (b, a)):
            mean[x, y] = v.mean()
            sd[x, y] = v.std(ddof=1) if v.size > 1 else np.nan
            n_pairs[x, y] = v.size
    return {"archs": archs, "mean": mean, "sd": sd, "n_pairs": n_pairs}


def balanced_probe_episodes(episodes_by_arch: dict, n_total: int = 24, seed: int = 0) -> dict:
    """Equal shares of ``n_total`` probe episodes from every architecture's valid episodes (SPEC §6.4).

    Each architecture draws ``n_total / len(archs)`` episodes without replacement from its own list, with a
    generator seeded by ``(seed, crc32(arch))`` so one architecture's draw does not depend on the others present.
    The chosen episodes keep their input order. The caller hashes and stores the resulting list.
    """
    if isinstance(n_total, bool) or not isinstance(n_total, (int, np.integer)) or n_total <= 0:
        raise InterbrainError(f"n_total must be a positive integer, got {n_total!r}")
    if not episodes_by_arch:
        raise InterbrainError("balanced_probe_episodes needs at least one architecture")
    n_arch = len(episodes_by_arch)
    if n_total % n_arch:
        raise InterbrainError(f"n_total={n_total} cannot be split equally over {n_arch} architectures")
    share = n_total // n_arch
    out = {}
    for arch, episodes in episodes_by_arch.items():
        episodes = list(episodes)
        if len(episodes) < share:
            raise InterbrainError(
                f"architecture {arch!r} has {len(episodes)} valid episodes, needs {share} for the probe"
            )
        rng = np.random.default_rng([int(seed), zlib.crc32(str(arch).encode())])
        chosen = np.sort(rng.choice(len(episodes), size=share, replace=False))
        out[arch] = [episodes[i] for i in chosen]
    return out


# ------------------------------------------------------------------------------------------------ study driver
CKA_PROTOCOL = "cka_v1"


def probe_states(agent, obs, *, chunk: int = 8):
    """Teacher-force one network on probe observations [T, N, 200] from zero state per episode -> [T*N, 256].

    Attention models apply their own trained-context rule inside ``sequence`` (SPEC §3.2)."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, obs.shape[1], chunk):
            x = torch.as_tensor(obs[:, start:start + chunk], dtype=torch.float32)
            _, _, hidden = agent.sequence(x)
            out.append(hidden.cpu().numpy())
    h = np.concatenate(out, axis=1)  # [T, N, 256]
    return h.reshape(-1, h.shape[-1])


def cka_study(checkpoints: dict, rollouts: dict, out_matrix_csv, out_pairs_csv, *, n_episodes: int = 24, seed: int = 0,
              device: str = "auto"):
    """Cross-architecture linear CKA of chaser networks on one balanced common probe (SPEC §6.4).

    ``rollouts[arch]``: that architecture's social analysis rollouts; the probe takes equal shares of valid episodes
    from every architecture (n_episodes rounded down to a multiple of the number of architectures), and the list is
    hashed. Every network in ``checkpoints[arch]`` is teacher-forced on the probe; across architectures all seed pairs
    are compared, within an architecture all i != j pairs (the diagonal is the cross-seed ceiling).
    """
    import hashlib
    import json

    from interbrain.checkpoint import load_agents
    from interbrain.io import sha256_file, write_csv_atomic
    from interbrain.rollout import load_rollout

    archs = list(checkpoints)
    if set(archs) != set(rollouts):
        raise InterbrainError(f"cka_study: checkpoints cover {sorted(archs)} but rollouts cover {sorted(rollouts)}")
    candidates, obs_of = {}, {}
    for arch in archs:
        candidates[arch] = []
        for path in rollouts[arch]:
            data, meta = load_rollout(path)
            key = (str(path), sha256_file(path))
            obs_of[key] = data["chaser_obs"]
            valid = np.flatnonzero(~data["episode_degenerate"].astype(bool))
            candidates[arch].extend((key, int(e)) for e in valid)
    share = max(n_episodes // len(archs), 1)
    chosen = balanced_probe_episodes(candidates, n_total=share * len(archs), seed=seed)
    probe_list = [(arch, key[0], key[1], e) for arch in archs for key, e in chosen[arch]]
    probe_sha = hashlib.sha256(json.dumps([(p[2], p[3]) for p in probe_list]).encode()).hexdigest()
    obs = np.stack([obs_of[key][:, e] for arch in archs for key, e in chosen[arch]], axis=1)  # [T, N, 200]

    features = {}
    for arch in archs:
        for path in checkpoints[arch]:
            ckpt, agents = load_agents(path, device="cpu")
            if (arch, ckpt.config.seed) in features:
                raise InterbrainError(f"cka_study: two {arch} networks with seed {ckpt.config.seed} ({path})")
            features[(arch, ckpt.config.seed)] = probe_states(agents["chaser"], obs)
    result = cka_matrix(features)
    rows = []
    for i, a in enumerate(result["archs"]):
        for j, b in enumerate(result["archs"]):
            rows.append({"schema_version": 1, "protocol": CKA_PROTOCOL, "arch_a": a, "arch_b": b,
                         "mean": result["mean"][i, j], "sd": result["sd"][i, j], "n_pairs": int(result["n_pairs"][i, j]),
                         "probe": "balanced", "probe_episodes": len(probe_list), "probe_sha256": probe_sha})
    write_csv_atomic(out_matrix_csv, rows)
    keys = list(features)
    pairs = [{"arch_a": ka[0], "seed_a": ka[1], "arch_b": kb[0], "seed_b": kb[1],
              "cka": linear_cka(features[ka], features[kb])} for i, ka in enumerate(keys) for kb in keys[i + 1:]]
    write_csv_atomic(out_pairs_csv, pairs, ["arch_a", "seed_a", "arch_b", "seed_b", "cka"])
    return out_matrix_csv
