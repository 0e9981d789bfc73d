# Per-architecture tables, report and manifest; the cross-architecture report (SPEC §6.7, §5.4).


rule unit_tables:
    """An architecture's tables: behaviour from the evaluation JSONL, and the concatenated analysis CSVs."""
    input:
        unpack(arch_table_inputs),
    output:
        behavior=report(
            "results/{arch}/derived/tables/behavior.csv",
            caption="../report/tables.rst",
            category="Behaviour",
            subcategory="{arch}",
            labels={"arch": "{arch}", "table": "behaviour"},
        ),
        decoding=report(
            "results/{arch}/derived/tables/decoding.csv",
            caption="../report/tables.rst",
            category="Decoding",
            subcategory="{arch}",
            labels={"arch": "{arch}", "table": "decoding"},
        ),
        plsc=report(
            "results/{arch}/derived/tables/plsc.csv",
            caption="../report/tables.rst",
            category="PLSC",
            subcategory="{arch}",
            labels={"arch": "{arch}", "table": "PLSC"},
        ),
        partner=report(
            "results/{arch}/derived/tables/partner.csv",
            caption="../report/tables.rst",
            category="Partner representation",
            subcategory="{arch}",
            labels={"arch": "{arch}", "table": "partner representation"},
        ),
        dynamics=report(
            "results/{arch}/derived/tables/dynamics.csv",
            caption="../report/tables.rst",
            category="Dynamics",
            subcategory="{arch}",
            labels={"arch": "{arch}", "table": "choice dynamics"},
        ),
        perturbation=report(
            "results/{arch}/derived/tables/perturbation.csv",
            caption="../report/tables.rst",
            category="Perturbation",
            subcategory="{arch}",
            labels={"arch": "{arch}", "table": "perturbation"},
        ),
    log:
        "logs/unit_tables/{arch}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/unit_tables.py"


rule arch_report:
    """One architecture's Markdown report and figures."""
    input:
        tables=lambda wc: arch_tables(wc.arch),
        metrics=lambda wc: arch_metrics(wc.arch),
    output:
        md=report(
            "results/{arch}/derived/reports/report.md",
            caption="../report/arch_report.rst",
            category="Reports",
            subcategory="{arch}",
            labels={"arch": "{arch}", "file": "report.md"},
        ),
        figures=report(
            directory("results/{arch}/derived/reports/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Reports",
            subcategory="{arch}",
            labels={"arch": "{arch}", "file": "{name}"},
        ),
    params:
        tables_dir=lambda wc: tables_dir(wc.arch),
    log:
        "logs/arch_report/{arch}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/arch_report.py"


rule manifest:
    """An architecture's manifest: inputs and outputs with sha256, the resolved config, provenance (SPEC §5.4)."""
    input:
        unpack(manifest_inputs),
        report="results/{arch}/derived/reports/report.md",
        tables=lambda wc: arch_tables(wc.arch),
        eval_jsonl="results/{arch}/paper_random_eval.jsonl",
    output:
        "results/{arch}/manifest.json",
    params:
        outputs=manifest_outputs,
        config=arch_config,
    log:
        "logs/manifest/{arch}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/manifest.py"


rule cross_report:
    """The cross-architecture report: per-architecture tables side by side, CKA, the PLSC matrix, SPEC §7 references."""
    input:
        unpack(cross_inputs),
    output:
        md=report(
            f"{CROSS}/report.md",
            caption="../report/cross_report.rst",
            category="Reports",
            subcategory="cross-architecture",
            labels={"file": "report.md"},
        ),
        plsc_matrix=report(
            f"{CROSS}/plsc_matrix.csv",
            caption="../report/plsc_matrix.rst",
            category="PLSC",
            subcategory="cross-architecture",
            labels={"table": "PLSC matrix"},
        ),
        figures=report(
            directory(f"{CROSS}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Reports",
            subcategory="cross-architecture",
            labels={"file": "{name}"},
        ),
    params:
        arch_tables={a: tables_dir(a) for a in ARCHS},
        metrics={a: arch_metrics(a) for a in ARCHS},
        config=config,
    log:
        "logs/cross_report/cross_report.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/cross_report.py"
