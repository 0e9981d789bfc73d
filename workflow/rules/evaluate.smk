# Random-opponent behavioural evaluation, protocol random_opponent_v1 (SPEC §5.2).


rule evaluate:
    """Every saved checkpoint of a unit against a uniform-random opponent (both matchups, plus the random-vs-random
    baseline); non-social units also under the configured vision controls."""
    input:
        checkpoints=unit_checkpoints,
        health=unit_health,
    output:
        report(
            "results/{arch}/{task}/seed_{seed}/random_eval.jsonl",
            caption="../report/random_eval.rst",
            category="Behaviour",
            subcategory="{arch}",
            labels=unit_labels,
        ),
    params:
        episodes=config["evaluation"]["episodes"],
        steps=config["evaluation"]["steps"],
        seed=config["evaluation"]["seed"],
        visibilities=unit_eval_visibilities,
        device=config["device"],
    log:
        "logs/evaluate/{arch}/{task}/seed_{seed}.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/evaluate.py"


rule gather_eval:
    """Concatenate an architecture's unit evaluations."""
    input:
        arch_eval_inputs,
    output:
        "results/{arch}/paper_random_eval.jsonl",
    log:
        "logs/gather_eval/{arch}.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/gather_eval.py"
