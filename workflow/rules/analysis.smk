# Neural analyses of the rollouts (SPEC §6): decoding, PLSC, partner representation, choice dynamics, perturbation,
# CKA.


rule decode:
    """Event decoding from hidden states (SPEC §6.1), episode-grouped and timestep folds, shuffled-label null."""
    input:
        rollout="results/{arch}/paper_rollouts/{rollout}.safetensors",
    output:
        report(
            "results/{arch}/derived/decoding/{rollout}.csv",
            caption="../report/decoding.rst",
            category="Decoding",
            subcategory="{arch}",
            labels=rollout_labels,
        ),
    params:
        n_shuffles=config["decoding"]["n_shuffles"],
        schemes=config["decoding"]["schemes"],
        lag=config["decoding"]["lag"],
        seed=config["decoding"]["seed"],
    log:
        "logs/decode/{arch}/{rollout}.log",
    benchmark:
        "logs/benchmarks/decode/{arch}/{rollout}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/decode.py"


rule plsc:
    """PLSC shared subspace with the circular-shift null and its labelled variants (SPEC §6.2)."""
    input:
        rollout="results/{arch}/paper_rollouts/{rollout}.safetensors",
    output:
        csv=report(
            "results/{arch}/derived/plsc/{rollout}.csv",
            caption="../report/plsc.rst",
            category="PLSC",
            subcategory="{arch}",
            labels=rollout_labels,
        ),
        tensors="results/{arch}/derived/plsc/{rollout}.safetensors",
    params:
        n_null=config["plsc"]["n_null"],
        min_shift=config["plsc"]["min_shift"],
        seed=config["plsc"]["seed"],
        variants=config["plsc"]["variants"],
    log:
        "logs/plsc/{arch}/{rollout}.log",
    benchmark:
        "logs/benchmarks/plsc/{arch}/{rollout}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/plsc.py"


rule partner:
    """Partner representation in the chaser's neural action space (SPEC §6.5)."""
    input:
        rollout="results/{arch}/paper_rollouts/{rollout}.safetensors",
    output:
        report(
            "results/{arch}/derived/partner/{rollout}.csv",
            caption="../report/partner.rst",
            category="Partner representation",
            subcategory="{arch}",
            labels=rollout_labels,
        ),
    params:
        n_shifts=config["partner"]["n_shifts"],
        seed=config["partner"]["seed"],
    log:
        "logs/partner/{arch}/{rollout}.log",
    benchmark:
        "logs/benchmarks/partner/{arch}/{rollout}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/partner.py"


rule dynamics:
    """Choice dynamics: each agent's preference L_t vs its change, per event, with fixed points (dynamics_v1)."""
    input:
        rollout="results/{arch}/paper_rollouts/{rollout}.safetensors",
    output:
        report(
            "results/{arch}/derived/dynamics/{rollout}.csv",
            caption="../report/dynamics.rst",
            category="Dynamics",
            subcategory="{arch}",
            labels=rollout_labels,
        ),
    params:
        l_min=config["dynamics"]["l_min"],
        l_max=config["dynamics"]["l_max"],
        n_bins=config["dynamics"]["n_bins"],
        min_count=config["dynamics"]["min_count"],
    log:
        "logs/dynamics/{arch}/{rollout}.log",
    benchmark:
        "logs/benchmarks/dynamics/{arch}/{rollout}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/dynamics.py"


rule perturb:
    """Shared-subspace removal on a social unit's final checkpoint (SPEC §6.6)."""
    input:
        checkpoint=lambda wc: checkpoint_path(wc.arch, "social", wc.seed, FINAL),
        rollout="results/{arch}/paper_rollouts/social__seed_{seed}.safetensors",
    output:
        csv=report(
            "results/{arch}/derived/perturbation/social__seed_{seed}.csv",
            caption="../report/perturbation.rst",
            category="Perturbation",
            subcategory="{arch}",
            labels=lambda wc: {"arch": wc.arch, "task": "social", "seed": wc.seed},
        ),
        bases="results/{arch}/derived/perturbation/social__seed_{seed}_bases.safetensors",
    params:
        episodes=config["perturbation"]["episodes"],
        steps=config["perturbation"]["steps"],
        seed=config["perturbation"]["seed"],
        opponent=config["perturbation"]["opponent"],
        k=config["perturbation"]["k"],
        device=config["device"],
    log:
        "logs/perturb/{arch}/social__seed_{seed}.log",
    benchmark:
        "logs/benchmarks/perturb/{arch}/social__seed_{seed}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/perturb.py"


rule cka:
    """Linear CKA between the social chasers of every architecture pair, all seed pairs, balanced probe (SPEC §6.4)."""
    input:
        unpack(cka_inputs),
    output:
        matrix=report(
            f"{CROSS}/cka_matrix.csv",
            caption="../report/cka.rst",
            category="CKA",
            labels={"table": "CKA matrix (mean, SD)"},
        ),
        pairs=report(
            f"{CROSS}/cka_pairs.csv",
            caption="../report/cka.rst",
            category="CKA",
            labels={"table": "CKA per network pair"},
        ),
    params:
        checkpoints=cka_checkpoints_by_arch(),
        rollouts=cka_rollouts_by_arch(),
        n_episodes=config["cka"]["n_episodes"],
        seed=config["cka"]["seed"],
        device=config["device"],
    log:
        "logs/cka/cka.log",
    benchmark:
        "logs/benchmarks/cka/cka.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../envs/analysis.yaml"
    script:
        "../scripts/cka.py"
