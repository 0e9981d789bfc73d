"""rule evaluate: interbrain.evaluate.evaluate_unit over every checkpoint of a unit."""

from wfcommon import as_list, job

with job(snakemake) as sm:
    from interbrain.evaluate import evaluate_unit

    p = sm.params
    evaluate_unit(as_list(sm.input.checkpoints), sm.output[0], episodes=p.episodes, steps=p.steps, seed=p.seed,
                  visibilities=list(p.visibilities) if p.visibilities else None, device=p.device)
