# interbrain: reproduction of Zhang et al. 2025 (Nature 645, 991-1001) and a cross-architecture extension.
#
#   snakemake --cores all                                                 # default study (config.yaml)
#   snakemake --configfile configs/paper.yaml --profile profiles/slurm    # the paper-scale study on SLURM
#   snakemake --configfile configs/smoke.yaml --cores 2                   # a tiny end-to-end check
#   snakemake --report report.html                                        # after a run
#
# Stages (SPEC "Pipeline stages"): train -> health -> evaluate/gather_eval -> rollout -> decode, plsc, partner,
# perturb, cka -> unit_tables -> arch_report, manifest -> cross_report. Paths and producers: docs/ARTIFACTS.md.
# The config is validated (workflow/schemas/config.schema.yaml) in workflow/rules/common.smk before any job.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/rollout.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/report.smk"


quarantine_corrupt_checkpoints()


rule all:
    input:
        final_targets(),
    default_target: True
