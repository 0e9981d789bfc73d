"""Choice dynamics (interbrain.analysis.dynamics): hand-computed preferences, a planted flow with known fixed points,
the event partition, degenerate episodes, and the CLI's one-line errors."""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from interbrain.analysis.dynamics import (ALL, EVENTS, VALUE_FIELDS, agent_pairs, binned_flow, dynamics_file,
                                          dynamics_rollout, fields, fixed_points, preference, preference_change,
                                          transition_events)
from interbrain.analysis.decoding import IDENTITY_FIELDS
from interbrain.errors import InterbrainError
from interbrain.rollout import save_rollout

META = {"protocol": "analysis_selfplay_v1", "schema_version": 1, "unit_id": "rnn/social/seed_0002", "arch": "rnn",
        "size": "matched", "task": "social", "seed": 2, "visibility": "partial",
        "checkpoint": {"path": "c", "sha256": "s", "update": 800}}
CLI = [sys.executable, "-m", "interbrain"]


# ---------------------------------------------------------------------------------------------------------------
# hand-computed values
# ---------------------------------------------------------------------------------------------------------------

def test_preference_and_change_by_hand():
    # t0: uniform -> p(0) = 1/4, L = log(1/3); t1: logits (log 3, 0, 0, 0) -> p(0) = 3/6, L1(0) = 0;
    # chosen at t1 is action 2: p(2) = 1/6 -> L = log(1/5); t2: (0, 0, log 6, 0) -> p(2) = 6/9, L2(2) = log 2.
    logits = np.array([[0, 0, 0, 0], [math.log(3), 0, 0, 0], [0, 0, math.log(6), 0]], float)[:, None, :]
    actions = np.array([0, 2, 2])[:, None]
    assert preference(logits, actions)[:, 0] == pytest.approx([-math.log(3), -math.log(5), math.log(2)], abs=1e-12)
    L, dL = preference_change(logits, actions)
    assert L.shape == dL.shape == (2, 1)
    # dL_0 evaluates action 0 (chosen at t0) under t1's policy: 0 - log(1/3); dL_1: log 2 - log(1/5) = log 10
    assert L[:, 0] == pytest.approx([-math.log(3), -math.log(5)], abs=1e-12)
    assert dL[:, 0] == pytest.approx([math.log(3), math.log(10)], abs=1e-12)


def test_preference_is_stable_for_large_logits_and_matches_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (50, 4))
    actions = rng.integers(0, 4, 50)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    pc = p[np.arange(50), actions]
    assert preference(logits, actions) == pytest.approx(np.log(pc) - np.log1p(-pc), abs=1e-9)
    big = np.array([[800.0, 0.0, 0.0, 0.0]])
    assert preference(big, np.array([0])) == pytest.approx([800.0 - math.log(3)])
    assert preference(big, np.array([1])) == pytest.approx([-800.0])


def test_bad_inputs_raise():
    with pytest.raises(InterbrainError, match="ids outside"):
        preference(np.zeros((3, 4)), np.array([0, 4, 1]))
    with pytest.raises(InterbrainError, match="non-finite"):
        preference(np.array([[np.nan, 0, 0, 0]]), np.array([0]))
    with pytest.raises(InterbrainError, match="at least 2 time steps"):
        preference_change(np.zeros((1, 2, 4)), np.zeros((1, 2), int))


# ---------------------------------------------------------------------------------------------------------------
# event partition
# ---------------------------------------------------------------------------------------------------------------

def test_event_partition_priority_and_alignment():
    C, N, V, I = (EVENTS.index(e) for e in ("collision", "new_field", "visible", "invisible"))
    # one episode, T = 7 transitions -> labels for t = 0..5 (the last transition has no next policy)
    collision = np.array([1, 1, 0, 0, 0, 0, 1], bool)[:, None]
    new_field = np.array([1, 0, 1, 1, 0, 0, 0], bool)[:, None]
    # fov is a state series s_0..s_7: fov[t+1] is the view after transition t
    fov = np.array([1, 0, 1, 1, 0, 1, 0, 1], bool)[:, None]
    labels = transition_events(collision, fov, new_field)[:, 0]
    # t0: collision + new field -> collision; t1: collision (fov[2] irrelevant); t2: new field, fov[3] visible ->
    # new_field; t3: new field, fov[4] not visible -> new_field; t4: fov[5] -> visible; t5: fov[6] = 0 -> invisible
    assert labels.tolist() == [C, C, N, N, V, I]
    # fov[0] (the state before the first action) is never used: flipping it changes nothing
    fov2 = fov.copy()
    fov2[0] = ~fov2[0]
    assert transition_events(collision, fov2, new_field)[:, 0].tolist() == labels.tolist()


def test_events_partition_every_pair_once(tmp_path):
    data = _planted(T=60, E=5, seed=3)[0]
    rows = pd.DataFrame(dynamics_rollout(data))
    s = rows[rows["kind"] == "summary"]
    for agent in ("chaser", "explorer"):
        a = s[s["agent"] == agent].set_index("event")
        parts = a.loc[list(EVENTS), "n"] + a.loc[list(EVENTS), "n_out_of_range"]
        assert parts.sum() == a.loc[ALL, "n"] + a.loc[ALL, "n_out_of_range"] == 59 * 5


# ---------------------------------------------------------------------------------------------------------------
# binning and fixed points
# ---------------------------------------------------------------------------------------------------------------

def test_binned_flow_by_hand():
    edges = np.array([-1.0, 0.0, 1.0, 2.0])
    L = np.array([-0.5, -0.25, 0.5, 2.0, 2.5, -3.0])  # 2.0 belongs to the last bin; 2.5 and -3 are out of range
    dL = np.array([1.0, 3.0, -1.0, 4.0, 9.0, 9.0])
    rows = binned_flow(L[:4], dL[:4], edges)
    assert [r["bin"] for r in rows] == [0, 1, 2]
    b0 = rows[0]
    assert (b0["n"], b0["l_mean"], b0["delta_mean"], b0["l_centre"]) == (2, -0.375, 2.0, -0.5)
    assert b0["delta_sd"] == pytest.approx(math.sqrt(2)) and b0["delta_sem"] == pytest.approx(1.0)
    assert rows[1]["delta_sd"] is None and rows[2]["n"] == 1


def test_fixed_points_by_hand():
    # mean flow +1 at x = 0, -1 at x = 1 -> L* = 0.5, slope -2 (not stable: the boundary); a second, repelling
    # crossing between x = 2 (-1) and x = 3 (+3) -> L* = 2.25, slope +4; the sparse bin at x = 1.5 is skipped
    fps = fixed_points([0.0, 1.0, 1.5, 2.0, 3.0], [1.0, -1.0, 5.0, -1.0, 3.0], [20, 20, 2, 20, 20], min_count=10)
    assert [(f["l_star"], f["slope"], f["stable"]) for f in fps] == [(0.5, -2.0, False), (2.25, 4.0, False)]
    fps = fixed_points([0.0, 1.0], [0.3, -0.2])
    assert fps[0]["l_star"] == pytest.approx(0.6) and fps[0]["slope"] == pytest.approx(-0.5) and fps[0]["stable"]
    assert fixed_points([0.0, 1.0, 2.0], [1.0, 0.5, 0.2]) == []


PLANTED = {"collision": (2.0, 0.5), "new_field": (1.0, 0.3), "visible": (0.0, 0.3), "invisible": (-1.0, 0.5)}


def _planted(T=400, E=100, seed=0, noise=0.3):
    """A rollout whose chosen-action preference follows L_{t+1} = L_t + k_e (L*_e - L_t) + noise, e the event of
    the transition t -> t+1 (drawn uniformly), with (L*_e, k_e) = PLANTED[e]. Each episode repeats one action (so
    the chain is the same action's preference); logits: l_c = L + log 3, the others 0, so that L(c) = L."""
    rng = np.random.default_rng(seed)
    data = {}
    ev_names = list(PLANTED)
    labels = rng.integers(0, 4, (T, E))          # event of transition t (the last one is unused)
    collision = labels == ev_names.index("collision")
    fov = np.zeros((T + 1, E), bool)
    fov[1:] = labels == ev_names.index("visible")  # fov[t+1]: partner in view after transition t
    # sprinkle fov into collision / new-field transitions too: the priority must ignore it there
    fov[1:] |= (labels < 2) & (rng.random((T, E)) < 0.5)
    for agent in ("chaser", "explorer"):
        new_field = labels == ev_names.index("new_field")
        L = np.zeros((T, E))
        L[0] = rng.uniform(-2, 3, E)
        for t in range(T - 1):
            star, k = np.array([PLANTED[e][0] for e in ev_names])[labels[t]], np.array(
                [PLANTED[e][1] for e in ev_names])[labels[t]]
            L[t + 1] = L[t] + k * (star - L[t]) + noise * rng.standard_normal(E)
        act = np.broadcast_to(np.arange(E) % 4, (T, E))
        logits = np.zeros((T, E, 4))
        np.put_along_axis(logits, act[..., None], (L + math.log(3))[..., None], -1)
        data[f"{agent}_logits"] = logits.astype(np.float32)
        data[f"{agent}_action"] = act.astype(np.int8)
        data[f"{agent}_new_field"] = new_field
        data[f"{agent}_fov"] = fov
        data[f"{agent}_L"] = L
    data["collision"] = collision
    data["episode_degenerate"] = np.zeros(E, bool)
    return data, labels


def test_planted_fixed_points_and_slopes_are_recovered():
    data, _ = _planted()
    L_chk, dL_chk, _ = agent_pairs(data, "chaser")
    assert L_chk == pytest.approx(data["chaser_L"][:-1], abs=1e-4)   # float32 logits
    # bins of width 0.5 (the default grid's): the bracket slope is a difference of two bin means, so it is the
    # noisier estimate (worst error over 64 planted draws: 0.06 for L*, 0.11 for the slope)
    rows = pd.DataFrame(dynamics_rollout(data, l_min=-4, l_max=6, n_bins=20, min_count=20))
    fp = rows[rows["kind"] == "fixed_point"]
    for agent in ("chaser", "explorer"):
        for event, (star, k) in PLANTED.items():
            f = fp[(fp["agent"] == agent) & (fp["event"] == event)]
            assert len(f) == 1, (agent, event, f[["l_star", "slope"]].to_dict("records"))
            f = f.iloc[0]
            assert f["l_star"] == pytest.approx(star, abs=0.15), (agent, event)
            assert f["slope"] == pytest.approx(-k, abs=0.2) and f["slope"] < 0, (agent, event)
            assert f["stable"] and f["n_fixed_points"] == 1
    # the binned mean flow itself follows k (L* - l_mean) where bins are well populated
    b = rows[(rows["kind"] == "bin") & (rows["agent"] == "chaser") & (rows["event"] == "visible") & (rows["n"] >= 200)]
    assert len(b) >= 4
    assert b["delta_mean"].to_numpy() == pytest.approx(0.3 * (0.0 - b["l_mean"].to_numpy()), abs=0.05)


def test_degenerate_episodes_are_excluded(tmp_path):
    data, _ = _planted(T=120, E=8, seed=1)
    ref = pd.DataFrame(dynamics_rollout({k: (v[:, :6] if v.ndim >= 2 and v.shape[1] == 8 else v[:6] if k.startswith(
        "episode_") else v) for k, v in data.items()}))
    # two extra episodes with wild logits, flagged degenerate: the output must not change
    data["episode_degenerate"] = np.array([False] * 6 + [True] * 2)
    for agent in ("chaser", "explorer"):
        data[f"{agent}_logits"][:, 6:] = np.random.default_rng(9).normal(0, 5, data[f"{agent}_logits"][:, 6:].shape)
    data.pop("chaser_L"), data.pop("explorer_L")
    out = pd.DataFrame(dynamics_rollout(data))
    pd.testing.assert_frame_equal(out, ref)
    path = save_rollout(data, META, tmp_path / "r.safetensors")
    table = pd.read_csv(dynamics_file(path, tmp_path / "d.csv"))
    assert list(table.columns) == list(IDENTITY_FIELDS) + list(VALUE_FIELDS) == list(fields())
    assert (table["n_valid_episodes"] == 6).all() and (table["status"] == "ok").all()
    assert (table["protocol"] == "dynamics_v1").all() and (table["update"] == 800).all()
    s = table[(table["kind"] == "summary") & (table["event"] == "all") & (table["agent"] == "chaser")]
    assert int(s["n"].item() + s["n_out_of_range"].item()) == 119 * 6


def test_degenerate_unit_has_summary_rows_without_values(tmp_path):
    data, _ = _planted(T=60, E=4, seed=2)
    data.pop("chaser_L"), data.pop("explorer_L")
    data["episode_degenerate"] = np.array([True, True, False, False])
    table = pd.read_csv(dynamics_file(save_rollout(data, META, tmp_path / "r.safetensors"), tmp_path / "d.csv"))
    assert len(table) == 2 * (len(EVENTS) + 1) and set(table["kind"]) == {"summary"}
    assert (table["status"] == "degenerate_unit").all() and table["n"].isna().all() and table["l_star"].isna().all()


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_writes_the_table_and_fails_in_one_line(tmp_path):
    data, _ = _planted(T=80, E=4, seed=4)
    data.pop("chaser_L"), data.pop("explorer_L")
    ro = save_rollout(data, META, tmp_path / "r.safetensors")
    ok = _cli("dynamics", "--rollout", ro, "--out", tmp_path / "d.csv", "--bins", "20", "--min-count", "5")
    assert ok.returncode == 0, ok.stderr
    t = pd.read_csv(tmp_path / "d.csv")
    assert set(t["kind"]) == {"summary", "bin", "fixed_point"} and set(t["agent"]) == {"chaser", "explorer"}
    assert (t["min_count"] == 5).all() and t["bin"].max() < 20

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for args, needle in (((tmp_path / "missing.safetensors",), "missing rollout"),
                         ((corrupt,), "corrupt rollout"),
                         ((ro, "--bins", "1"), "n_bins must be an integer >= 2"),
                         ((ro, "--l-min", "3", "--l-max", "1"), "l_min < l_max")):
        out = tmp_path / "bad.csv"
        proc = _cli("dynamics", *args, "--out", out)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("interbrain dynamics: error:") and needle in lines[0], lines
        assert not out.exists()
