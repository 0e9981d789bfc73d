# Training (SPEC §4) and checkpoint health (SPEC §5.1).


localrules:
    train_request,


# The learning settings of a unit, as params of `train` and `train_ensemble` (read by workflow/scripts/unit_work.py).
LEARNING_PARAMS = dict(
    preset=TRAIN["preset"],
    updates=FINAL,
    size=TRAIN["size"],
    init=TRAIN["init"],
    spawn=TRAIN["spawn"],
    window=TRAIN["window"],
    pos=TRAIN["pos"],
    overrides=lambda wc: {**TRAIN["overrides"], **TRAIN["arch_overrides"].get(wc.arch, {})},
    agent_options=lambda wc: TRAIN["agent_options"].get(wc.arch, {}),
    checkpoint_every=EVERY,
    log_every=TRAIN["log_every"],
    device=TRAIN["device"],
)


rule train_request:
    """The unit's training request (the `train` rule's input). Rewritten before scheduling when a published
    checkpoint of the unit is found corrupt, which reruns the unit's training and everything downstream.
    Same priority as `train` (a priority does not pass to a job's inputs)."""
    priority: 10
    output:
        "results/{arch}/{task}/seed_{seed}/train_request.json",
    log:
        "logs/train_request/{arch}/{task}/seed_{seed}.log",
    threads: 1
    resources:
        mem_mb=100,
        runtime=1,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/train_request.py"


rule train:
    """Train one unit. The learner works in {unit}/train_work (not a Snakemake output, so a killed or failed job
    leaves it in place and the rerun resumes from its newest healthy checkpoint); only a completed run publishes
    the declared outputs (hard links to the checkpoints, copies of the JSONL logs). Training jobs go first
    (priority): they are the longest, and a unit trained last would leave the other cores idle at the end."""
    priority: 10
    input:
        request="results/{arch}/{task}/seed_{seed}/train_request.json",
    output:
        checkpoints=[
            "results/{arch}/{task}/seed_{seed}/checkpoints/update_%06d.safetensors" % u for u in SAVED_UPDATES
        ],
        latest="results/{arch}/{task}/seed_{seed}/checkpoints/latest.safetensors",
        metrics=report(
            "results/{arch}/{task}/seed_{seed}/metrics.jsonl",
            caption="../report/metrics.rst",
            category="Training",
            subcategory="{arch}",
            labels=unit_labels,
        ),
        events="results/{arch}/{task}/seed_{seed}/events.jsonl",
    params:
        work=lambda wc: f"{unit_dir(wc.arch, wc.task, wc.seed)}/train_work",
        arch=lambda wc: wc.arch,
        task=lambda wc: wc.task,
        seed=lambda wc: int(wc.seed),
        **LEARNING_PARAMS,
    log:
        "logs/train/{arch}/{task}/seed_{seed}.log",
    benchmark:
        "logs/benchmarks/train/{arch}/{task}/seed_{seed}.tsv"
    threads: TRAIN["threads"]
    resources:
        mem_mb=lambda wc, attempt: TRAIN["mem_mb"] * attempt,
        runtime=lambda wc, attempt: TRAIN["runtime"] * attempt,
        gpu=TRAIN["gpus"],
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/train.py"


# The batched ensemble (train.ensemble: true; interbrain.ensemble): every unit of an architecture that can train as
# an ensemble (ENSEMBLE_ARCHS) in one job, e.g. one GPU job for all 20 paper-scale RNN units. It publishes the same
# per-unit outputs as `train`, which it replaces for those architectures (ruleorder).
if ENSEMBLE_STUDY_ARCHS:

    ruleorder: train_ensemble > train

    rule train_ensemble:
        """Train all units (task x seed) of {arch} as one batched ensemble, each in its own train_work (resumable
        as in `train`), then publish every unit's outputs."""
        priority: 10
        wildcard_constraints:
            arch="|".join(ENSEMBLE_STUDY_ARCHS),
        input:
            requests=lambda wc: [f"{unit_dir(a, t, s)}/train_request.json" for a, t, s in units(wc.arch)],
        output:
            checkpoints=[
                f"results/{{arch}}/{t}/seed_{seed_tag(s)}/checkpoints/update_{u:06d}.safetensors"
                for t in TASKS
                for s in SEEDS
                for u in SAVED_UPDATES
            ],
            latest=[
                f"results/{{arch}}/{t}/seed_{seed_tag(s)}/checkpoints/latest.safetensors" for t in TASKS for s in SEEDS
            ],
            metrics=[
                report(
                    f"results/{{arch}}/{t}/seed_{seed_tag(s)}/metrics.jsonl",
                    caption="../report/metrics.rst",
                    category="Training",
                    subcategory="{arch}",
                    labels={"arch": "{arch}", "task": t, "seed": seed_tag(s)},
                )
                for t in TASKS
                for s in SEEDS
            ],
            events=[f"results/{{arch}}/{t}/seed_{seed_tag(s)}/events.jsonl" for t in TASKS for s in SEEDS],
        params:
            units=[(t, s) for t in TASKS for s in SEEDS],
            works=lambda wc: [f"{unit_dir(a, t, s)}/train_work" for a, t, s in units(wc.arch)],
            arch=lambda wc: wc.arch,
            **LEARNING_PARAMS,
        log:
            "logs/train_ensemble/{arch}.log",
        benchmark:
            "logs/benchmarks/train_ensemble/{arch}.tsv"
        threads: TRAIN["threads"]
        # One process holds every unit: measured on CPU, 20 paper-preset units peak at 0.74 GB of host memory against
        # 0.36 GB for one unit alone (~20 MB per extra unit; 100 MB allowed); on an H100 the 20-unit run peaked at
        # 1.8 GB of host memory (the CUDA context included). On a GPU the 20-unit ensemble takes an update in 58 ms
        # against 158 ms for one unit alone (H100, README), so one unit's runtime covers it; on CPU (no GPU
        # requested, or device cpu) the units' work adds up.
        resources:
            mem_mb=lambda wc, attempt: (TRAIN["mem_mb"] + 100 * (len(TASKS) * len(SEEDS) - 1)) * attempt,
            runtime=lambda wc, attempt: TRAIN["runtime"] * attempt * (
                1 if TRAIN["gpus"] and TRAIN["device"] != "cpu" else len(TASKS) * len(SEEDS)),
            gpu=TRAIN["gpus"],
        conda:
            "../envs/train.yaml"
        script:
            "../scripts/train_ensemble.py"


rule health:
    """Health-check every checkpoint of a unit; the job fails (and writes nothing) if any is unhealthy."""
    input:
        checkpoints=unit_checkpoints,
    output:
        "results/{arch}/{task}/seed_{seed}/health.json",
    log:
        "logs/health/{arch}/{task}/seed_{seed}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=15,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/health.py"
