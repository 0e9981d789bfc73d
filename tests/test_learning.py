"""Learning, end to end on CPU: a social RNN chaser trained with the `paper` preset beats a random chaser.

A uniform-random chaser makes about 1.6 collisions per 100-step episode against a uniform-random explorer. After 300
`paper` updates (seed 0, about 1.5 minutes on one core; the default study's learner for the RNN, which reached 6.4
collisions there in calibration) the trained chaser must clearly exceed that, and its untrained update-0 self.
Deterministic on CPU: same seed, same weights. (The one-epoch `fast` learner is volatile in self-play at this budget:
1.8 collisions at 600 updates, 4.2 at 800; README "Calibration".)
"""

import pytest

from interbrain.evaluate import evaluate_checkpoint
from interbrain.train import train

RANDOM_CHASER = 1.6


@pytest.mark.slow
def test_paper_preset_social_rnn_learns_to_chase(tmp_path):
    out = tmp_path / "unit"
    train("rnn", "social", 0, "paper", 300, device="cpu", out=out, checkpoint_every=300, log_every=100, progress=False)
    records = {}
    for update in (0, 300):
        (rec,) = evaluate_checkpoint(out / f"checkpoints/update_{update:06d}.safetensors", tmp_path / "ev.jsonl",
                                     episodes=200, device="cpu", matchups=("random_explorer",))
        records[update] = rec["metrics"]["collisions_per_episode"]
    assert records[0] < RANDOM_CHASER * 1.2  # the untrained chaser is no better than random
    assert records[300] > RANDOM_CHASER * 1.25, records  # clearly more collisions, with margin
    assert records[300] > records[0] + 0.5, records
