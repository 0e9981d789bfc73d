"""rule partner: interbrain.analysis.partner.partner_file (protocol partner_v1)."""

from wfcommon import job

with job(snakemake) as sm:
    from interbrain.analysis.partner import partner_file

    p = sm.params
    partner_file(sm.input.rollout, sm.output[0], n_shifts=p.n_shifts, seed=p.seed)
