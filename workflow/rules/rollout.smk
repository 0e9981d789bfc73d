# Analysis rollouts, protocol analysis_selfplay_v1 (SPEC §5.3).
#   {rollout} = {task}__seed_{seed}                              final checkpoint, the task's own visibility
#             | {task}__seed_{seed}__{visibility}__update_{u}    late checkpoints, partner checkpoints, vision controls


rule rollout:
    """Self-play episodes of one checkpoint with every hidden state recorded."""
    input:
        unpack(rollout_checkpoint_input),
    output:
        "results/{arch}/paper_rollouts/{rollout}.safetensors",
    params:
        visibility=lambda wc: parse_rollout(wc.rollout)["visibility"],
        episodes=config["rollout"]["episodes"],
        steps=config["rollout"]["steps"],
        seed=config["rollout"]["seed"],
        device=config["device"],
    log:
        "logs/rollout/{arch}/{rollout}.log",
    benchmark:
        "logs/benchmarks/rollout/{arch}/{rollout}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/train.yaml"
    script:
        "../scripts/rollout.py"
