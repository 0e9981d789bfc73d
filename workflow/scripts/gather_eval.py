"""rule gather_eval: interbrain.evaluate.gather over an architecture's unit evaluations."""

from wfcommon import as_list, job

with job(snakemake) as sm:
    from interbrain.evaluate import gather

    gather(as_list(sm.input), sm.output[0])
