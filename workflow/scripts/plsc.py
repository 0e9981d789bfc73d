"""rule plsc: interbrain.analysis.plsc.plsc_file (protocol plsc_v1)."""

from wfcommon import job

with job(snakemake) as sm:
    from interbrain.analysis.plsc import plsc_file

    p = sm.params
    plsc_file(sm.input.rollout, sm.output.csv, sm.output.tensors, n_null=p.n_null, min_shift=p.min_shift, seed=p.seed,
              variants=tuple(p.variants))
