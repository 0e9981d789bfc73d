"""rule dynamics: interbrain.analysis.dynamics.dynamics_file (protocol dynamics_v1)."""

from wfcommon import job

with job(snakemake) as sm:
    from interbrain.analysis.dynamics import dynamics_file

    p = sm.params
    dynamics_file(sm.input.rollout, sm.output[0], l_min=float(p.l_min), l_max=float(p.l_max), n_bins=int(p.n_bins),
                  min_count=int(p.min_count))
