"""rule perturb: interbrain.perturb.perturb_unit (protocol perturbation_v1) on a social unit's final checkpoint."""

from wfcommon import job

with job(snakemake) as sm:
    from interbrain.perturb import perturb_unit

    p = sm.params
    perturb_unit(sm.input.checkpoint, sm.input.rollout, sm.output.csv, sm.output.bases, episodes=p.episodes,
                 steps=p.steps, seed=p.seed, opponent=p.opponent, k=p.k, device=p.device)
