"""rule cross_report: interbrain.report.cross_report (the cross-architecture report, CKA and PLSC matrices)."""

from wfcommon import job

with job(snakemake) as sm:
    from interbrain.report import cross_report

    p = sm.params
    cross_report(arch_tables=dict(p.arch_tables), metrics={a: list(v) for a, v in p.metrics.items()},
                 cka_matrix=sm.input.cka_matrix, cka_pairs=sm.input.cka_pairs, out_md=sm.output.md,
                 figures_dir=sm.output.figures, plsc_matrix_csv=sm.output.plsc_matrix, config=dict(p.config))
