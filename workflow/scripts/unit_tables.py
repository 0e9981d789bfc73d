"""rule unit_tables: interbrain.report.tables.arch_tables (an architecture's behaviour and analysis tables)."""

from pathlib import Path

from wfcommon import as_list, job

with job(snakemake) as sm:
    from interbrain.report.tables import arch_tables

    out_dir = Path(sm.output.behavior).parent
    arch_tables(eval_jsonl=sm.input.eval_jsonl, decoding=as_list(sm.input.decoding), plsc=as_list(sm.input.plsc),
                partner=as_list(sm.input.partner), perturbation=as_list(sm.input.perturbation),
                dynamics=as_list(sm.input.dynamics), out_dir=str(out_dir))
