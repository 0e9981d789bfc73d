"""rule health: interbrain.checkpoint.health_report over every checkpoint of a unit."""

from wfcommon import as_list, job

with job(snakemake) as sm:
    from interbrain.checkpoint import health_report

    health_report(as_list(sm.input.checkpoints), sm.output[0])
