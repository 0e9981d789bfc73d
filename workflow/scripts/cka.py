"""rule cka: interbrain.analysis.cka.cka_study (protocol cka_v1) over the social chasers of every architecture."""

from wfcommon import job

with job(snakemake) as sm:
    from interbrain.analysis.cka import cka_study

    p = sm.params
    cka_study({a: list(v) for a, v in p.checkpoints.items()}, {a: list(v) for a, v in p.rollouts.items()},
              sm.output.matrix, sm.output.pairs, n_episodes=p.n_episodes, seed=p.seed, device=p.device)
