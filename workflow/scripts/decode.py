"""rule decode: interbrain.analysis.decoding.decode_file (protocol decoding_v1)."""

from wfcommon import job

with job(snakemake) as sm:
    from interbrain.analysis.decoding import decode_file

    p = sm.params
    decode_file(sm.input.rollout, sm.output[0], n_shuffles=p.n_shuffles, schemes=tuple(p.schemes), lag=p.lag,
                seed=p.seed)
