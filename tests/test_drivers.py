"""File drivers of the analyses: identity columns, fixed headers for degenerate units, values equal to the
underlying functions on the same data."""

import numpy as np
import pandas as pd

from interbrain.analysis.decoding import DECODING_FIELDS, decode_file, decode_rollout, synthetic_rollout
from interbrain.analysis.partner import build_predictors, neural_action_space, non_redundant_variance, partner_file
from interbrain.rollout import save_rollout

META = {"protocol": "analysis_selfplay_v1", "schema_version": 1, "unit_id": "mlp/social/seed_0003", "arch": "mlp",
        "size": "matched", "task": "social", "seed": 3, "visibility": "partial",
        "checkpoint": {"path": "c", "sha256": "s", "update": 400}}


def _decoding_rollout(degenerate=None):
    data = synthetic_rollout(T=200, E=12, D=16, seed=1)
    if degenerate is not None:
        data["episode_degenerate"] = degenerate
    return data


def test_decode_file_matches_decode_rollout(tmp_path):
    data = _decoding_rollout(np.array([False] * 10 + [True] * 2))
    path = save_rollout(data, META, tmp_path / "r.safetensors")
    decode_file(path, tmp_path / "d.csv", n_shuffles=5, schemes=("grouped",))
    table = pd.read_csv(tmp_path / "d.csv")
    assert list(table.columns) == list(DECODING_FIELDS)
    ref = {r.target: r for r in decode_rollout(data, n_shuffles=5)}
    for row in table.itertuples():
        assert row.seed == 3 and row.update == 400 and row.n_valid_episodes == 10 and row.scheme == "grouped"
        if ref[row.target].status == "ok":
            assert abs(row.balanced_accuracy - ref[row.target].balanced_accuracy) < 1e-12
    assert table.set_index("target").loc["chaser_collision", "balanced_accuracy"] > 0.7  # planted code


def test_decode_file_degenerate_unit_has_full_header_and_no_scores(tmp_path):
    path = save_rollout(_decoding_rollout(np.array([True] * 10 + [False] * 2)), META, tmp_path / "r.safetensors")
    decode_file(path, tmp_path / "d.csv", n_shuffles=5)
    table = pd.read_csv(tmp_path / "d.csv")
    assert list(table.columns) == list(DECODING_FIELDS) and len(table) == 8  # 4 targets x 2 schemes
    assert (table["status"] == "degenerate_unit").all() and table["balanced_accuracy"].isna().all()


def test_partner_file_matches_non_redundant_variance(tmp_path):
    rng = np.random.default_rng(0)
    T, E = 120, 4
    pos_c = rng.integers(0, 10, (T + 1, E, 2)).astype(np.int16)
    pos_e = rng.integers(0, 10, (T + 1, E, 2)).astype(np.int16)
    w = rng.standard_normal((4, 256))
    hidden = np.zeros((T, E, 256), np.float32)
    hidden[..., :2] = pos_e[:T] / 9.0  # the chaser's hidden codes the partner's position
    hidden += 0.01 * rng.standard_normal(hidden.shape).astype(np.float32)
    data = {"chaser_hidden": hidden, "chaser_pos": pos_c, "explorer_pos": pos_e,
            "chaser_action": rng.integers(0, 4, (T, E)).astype(np.int8),
            "explorer_action": rng.integers(0, 4, (T, E)).astype(np.int8),
            "episode_degenerate": np.zeros(E, bool)}
    for k in ("collision", "chaser_new_field", "chaser_approach", "explorer_new_field", "explorer_escape",
              "explorer_escape_close", "explorer_escape_near", "explorer_escape_far"):
        data[k] = np.zeros((T, E), bool)
    meta = dict(META, action_head_weight={"chaser": w.tolist(), "explorer": w.tolist()})
    path = save_rollout(data, meta, tmp_path / "r.safetensors")
    partner_file(path, tmp_path / "p.csv", n_shifts=3)
    row = pd.read_csv(tmp_path / "p.csv").iloc[0]
    ref = non_redundant_variance(neural_action_space(hidden, w), build_predictors(data, "chaser"), n_shifts=3)
    assert row["status"] == "ok" and abs(row["partner"] - ref["partner"]) < 1e-9
    assert row["partner"] > 10 * abs(row["contribution_self_position"])
