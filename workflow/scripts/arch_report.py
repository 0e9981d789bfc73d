"""rule arch_report: interbrain.report.arch_report (an architecture's Markdown report and figures)."""

from wfcommon import as_list, job

with job(snakemake) as sm:
    from interbrain.report import arch_report

    arch_report(arch=sm.wildcards.arch, tables_dir=sm.params.tables_dir, metrics=as_list(sm.input.metrics),
                out_md=sm.output.md, figures_dir=sm.output.figures)
