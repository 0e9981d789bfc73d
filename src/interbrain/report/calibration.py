"""Measured learning budgets: separate calibration runs, as data (the reports print them; README "Calibration").

These are not results of the study a report describes: each row is one unit trained outside the workflow
(``interbrain.train.train``, seed 0, ``matched`` size, CPU, one thread) and evaluated with the study's protocol
(SPEC §5.2: chaser collisions per 100-step episode against the uniform-random explorer, 100 episodes, evaluation
seed 0) at several checkpoints. They answer "how many updates does this architecture need before its social chaser
chases?", which the study itself (one budget for all) cannot. A uniform-random chaser makes about 1.5 collisions;
the four anchors' non-social chasers make 2.1–3.6 after 400 `paper` updates.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Where and when the rows were measured.
MACHINE = "2-core x86-64 CPU, no GPU (the development machine), 2026-11-22"


@dataclass(frozen=True)
class Run:
    arch: str
    task: str
    learner: str                      # preset, or what differs from it
    collisions: tuple[tuple[int, float], ...]  # (update, chaser collisions per episode vs the random explorer)
    note: str = ""


RUNS: tuple[Run, ...] = (
    Run("rnn", "social", "paper", ((100, 1.71), (200, 4.95), (300, 6.38), (400, 6.59))),
    Run("rnn", "social", "fast", ((200, 1.77), (400, 0.98), (600, 1.81), (800, 4.17))),
    Run("mlp", "social", "fast", ((100, 1.65), (200, 3.51), (300, 3.38), (400, 3.76))),
    Run("ssm", "social", "paper, 1 epoch", ((200, 1.68), (400, 5.46), (600, 5.56), (800, 10.07))),
    Run("ssm", "non_social", "paper, 1 epoch", ((200, 1.46), (400, 2.42))),
    Run("transformer", "social", "paper", ((100, 3.19), (200, 4.53), (300, 6.61), (400, 8.69))),
    Run("transformer", "social", "fast", ((200, 1.99), (400, 1.67))),
    Run("transformer", "non_social", "fast", ((200, 2.43), (400, 2.49))),
    Run("gru", "social", "paper", ((200, 6.16), (400, 8.16))),
    Run("gru", "non_social", "paper", ((200, 2.15), (400, 2.82))),
    Run("lstm", "social", "paper", ((200, 7.92), (400, 9.38))),
    Run("mingru", "social", "paper", ((200, 3.28), (400, 3.40))),
    Run("mingru", "social", "paper", ((400, 3.40), (800, 5.63), (1200, 7.70)),
        note="run on to 1,200 updates (same seed: identical up to 400)"),
    Run("mingru", "non_social", "paper", ((400, 2.71), (800, 3.28), (1200, 3.34))),
    Run("minlstm", "social", "paper", ((200, 2.84), (400, 3.33))),
    Run("minlstm", "social", "paper", ((400, 3.33), (800, 4.17), (1200, 5.72)),
        note="run on to 1,200 updates (same seed: identical up to 400)"),
    Run("minlstm", "non_social", "paper", ((400, 2.60), (800, 2.94), (1200, 3.26))),
    Run("disrnn", "social", "paper, β 1e-2", ((200, 1.91), (400, 1.54)),
        note="β·KL summed over the 2,110 bottlenecks (≈ 66 at the start) dominates the PPO loss after the warm-up"),
    Run("disrnn", "social", "paper, β 1e-4", ((100, 3.47), (200, 1.81), (300, 2.82), (400, 2.29)),
        note="chases best at the end of the noiseless warm-up (update 100); bottleneck noise and KL then undo it"),
    Run("disrnn", "social", "paper, β 1e-4, warm-up 300", ((200, 3.84), (400, 3.38), (600, 3.29)),
        note="a longer warm-up: the policy again stops improving once the bottlenecks turn on"),
    Run("disrnn", "social", "paper, β 1e-6", ((200, 3.97), (400, 4.16), (600, 6.97), (800, 11.65)),
        note="learns once the KL is too weak to close any bottleneck: all 2,110 stay open (σ < 0.1) at 400 and 800"),
    Run("disrnn", "non_social", "paper, β 1e-6", ((400, 3.39), (800, 3.01))),
    Run("tok_transformer", "social", "paper", ((200, 2.70), (400, 3.38)),
        note="about 2.1 s per update on one loaded core (≈ 3 × the transformer)"),
    Run("tok_transformer", "social", "paper", ((400, 3.38), (800, 5.03), (1200, 6.15)),
        note="run on to 1,200 updates (same seed: identical up to 400); 2,996 s of training under load"),
    Run("tok_transformer", "non_social", "paper", ((400, 2.99), (800, 3.53))),
)


def runs_for(archs) -> list[Run]:
    """The calibration runs of the given architectures, in the order of ``archs``."""
    return [r for a in archs for r in RUNS if r.arch == a]
