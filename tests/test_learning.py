"""Learning, end to end on CPU: a social RNN chaser trained with the `fast` preset beats a random chaser.

A uniform-random chaser makes about 1.6 collisions per 100-step episode against a uniform-random explorer. After 600
`fast` updates (seed 0, ~2 minutes on one core) the trained chaser must clearly exceed that, and its untrained
update-0 self. Deterministic on CPU: same seed, same weights.
"""

import pytest

from interbrain.evaluate import evaluate_checkpoint
from interbrain.train import train

RANDOM_CHASER = 1.6


@pytest.mark.slow
def test_fast_preset_social_rnn_learns_to_chase(tmp_path):
    out = tmp_path / "unit"
    train("rnn", "social", 0, "fast", 600, device="cpu", out=out, checkpoint_every=600, log_every=100, progress=False)
    records = {}
    for update in (0, 600):
        (rec,) = evaluate_checkpoint(out / f"checkpoints/update_{update:06d}.safetensors", tmp_path / "ev.jsonl",
                                     episodes=200, device="cpu", matchups=("random_explorer",))
        records[update] = rec["metrics"]["collisions_per_episode"]
    assert records[0] < RANDOM_CHASER * 1.2  # the untrained chaser is no better than random
    assert records[600] > RANDOM_CHASER * 1.25, records  # clearly more collisions, with margin
    assert records[600] > records[0] + 0.5, records
