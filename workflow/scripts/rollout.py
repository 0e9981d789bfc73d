"""rule rollout: interbrain.rollout.rollout_checkpoint (protocol analysis_selfplay_v1)."""

from wfcommon import job

with job(snakemake) as sm:
    from interbrain.rollout import rollout_checkpoint

    p = sm.params
    rollout_checkpoint(sm.input.checkpoint, sm.output[0], episodes=p.episodes, steps=p.steps, seed=p.seed,
                       visibility=p.visibility, device=p.device)
