# Shared by all the .smk files: config validation, the study's units and checkpoints, rollout names, input functions.
# Paths follow docs/ARTIFACTS.md. Nothing here prints at parse time (--dag / --rulegraph write DOT to stdout).

import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


# ------------------------------------------------------------------------------------------ config validation
def _config_error_line(exc):
    """One line naming the offending key (and value) of a config that fails the schema."""
    import jsonschema

    error, seen = exc, set()
    while error is not None and not isinstance(error, jsonschema.ValidationError) and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    if not isinstance(error, jsonschema.ValidationError):
        return "config error: " + (str(exc).strip().splitlines() or ["invalid config"])[0]
    error = jsonschema.exceptions.best_match([error] + list(error.context or []))
    where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in error.absolute_path).replace(".[", "[")
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(repr(f"{where}.{k}" if where else k) for k in extra)
        return f"config error: unknown key {keys}; allowed here: {', '.join(allowed)}"
    return f"config error: {where or '(top level)'}: {error.message}"


def _fail(message):
    sys.exit(f"config error: {message}")


try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as exc:
    sys.exit(_config_error_line(exc))


# ------------------------------------------------------------------------------------------ the study
ARCHS = list(config["archs"])
TASKS = list(config["tasks"])
SEEDS = [int(s) for s in config["seeds"]]
TRAIN = config["train"]
FINAL = int(TRAIN["updates"])
EVERY = int(TRAIN["checkpoint_every"])
TASK_VISIBILITY = {"social": "partial", "non_social": "none"}
SAVED_UPDATES = sorted(set(range(0, FINAL, EVERY)) | {FINAL})
ANALYSIS_UPDATES = sorted(set(config["late_updates"]) | {FINAL})
PARTNER_UPDATES = SAVED_UPDATES if config["partner"]["scope"] == "all" else ANALYSIS_UPDATES
CROSS = "results/cross_architecture_study"
# Architectures that can train as a batched ensemble: interbrain.ensemble.ENSEMBLE_ARCHS (a test keeps them equal;
# the Snakefile does not import the package). With train.ensemble, those of this study use rule train_ensemble.
ENSEMBLE_ARCHS = ["rnn"]
ENSEMBLE_STUDY_ARCHS = [a for a in ARCHS if a in ENSEMBLE_ARCHS] if TRAIN["ensemble"] else []

for _u in config["late_updates"]:
    if _u not in SAVED_UPDATES:
        _fail(f"late_updates: {_u} is not a saved checkpoint (0, every train.checkpoint_every={EVERY}, and "
              f"train.updates={FINAL})")
if not config["dynamics"]["l_min"] < config["dynamics"]["l_max"]:
    _fail(f"dynamics: l_min ({config['dynamics']['l_min']}) must be below l_max ({config['dynamics']['l_max']})")
if "social" not in TASKS:
    _fail("tasks: the CKA probe and the perturbation study need 'social'")

ROLLOUT_RE = r"(social|non_social)__seed_\d{4}(__(partial|none|full)__update_\d{6})?"

wildcard_constraints:
    arch="|".join(map(re.escape, ARCHS)),
    task="social|non_social",
    seed=r"\d{4}",
    rollout=ROLLOUT_RE,


# ------------------------------------------------------------------------------------------ names and paths
def seed_tag(seed):
    return f"{int(seed):04d}"


def unit_dir(arch, task, seed):
    return f"results/{arch}/{task}/seed_{seed_tag(seed)}"


def checkpoint_path(arch, task, seed, update):
    return f"{unit_dir(arch, task, seed)}/checkpoints/update_{int(update):06d}.safetensors"


def units(arch=None):
    """(arch, task, seed) of every unit of the study, or of one architecture."""
    return [(a, t, s) for a in ([arch] if arch else ARCHS) for t in TASKS for s in SEEDS]


def _safetensors_structure_error(path):
    """Why a safetensors file is structurally broken (unreadable, truncated, bad header), or None. Cheap: reads the
    header only. Non-finite values are the `health` rule's job."""
    import json
    import os
    import struct

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                return "header longer than the file"
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            return f"file is {size} bytes, header describes {8 + n + max(ends, default=0)}"
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        return f"unreadable ({type(exc).__name__})"
    return None


def write_train_request(path, unit, reason):
    """The `train` rule's input: which unit, and why it is (re)trained. Rewriting it reruns the unit's training."""
    import datetime
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"unit": unit, "reason": reason,
                   "requested_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, fh)
        fh.write("\n")
    os.replace(tmp, path)


def quarantine_corrupt_checkpoints():
    """Before scheduling, move structurally corrupt published checkpoints aside (`*.corrupt`) and rewrite the unit's
    `train_request.json` (the `train` rule's input). Snakemake does not regenerate a missing intermediate file whose
    descendants look up to date, but a newer input reruns `train`; the train script then retrains from scratch (a
    published checkpoint is a hard link into its working copy), and every descendant reruns because its inputs are
    newer. Skipped on dry runs and inside jobs."""
    if workflow.dryrun or not workflow.is_main_process:
        return
    for arch, task, seed in units():
        unit = unit_dir(arch, task, seed)
        names = [f"update_{u:06d}.safetensors" for u in SAVED_UPDATES] + ["latest.safetensors"]
        for name in names:
            path = f"{unit}/checkpoints/{name}"
            if os.path.exists(path):
                why = _safetensors_structure_error(path)
                if why:
                    os.replace(path, f"{path}.corrupt")
                    write_train_request(f"{unit}/train_request.json", f"{arch}/{task}/seed_{seed_tag(seed)}",
                                        f"corrupt checkpoint {name}: {why}")
                    print(f"corrupt checkpoint {path} ({why}): moved aside; {arch}/{task}/seed_{seed_tag(seed)} "
                          "will be retrained", file=sys.stderr)


def arch_config(wildcards):
    """The resolved config as it applies to one architecture: the study minus other architectures' overrides (so a
    change to one architecture's training settings leaves the other architectures' manifests up to date)."""
    import json

    resolved = json.loads(json.dumps(config))
    for key in ("arch_overrides", "agent_options"):
        own = resolved["train"].get(key, {}).get(wildcards.arch)
        resolved["train"][key] = {wildcards.arch: own} if own else {}
    resolved["arch"] = wildcards.arch
    return json.loads(json.dumps(resolved, sort_keys=True))  # canonical key order: params are compared serialised


def visibilities(task):
    """Analysis/evaluation visibilities of a task: its own first, then the vision controls (non-social only)."""
    own = TASK_VISIBILITY[task]
    extra = config["controls"]["non_social_visibilities"] if task == "non_social" else []
    return [own] + [v for v in extra if v != own]


def rollout_name(task, seed, visibility, update):
    """Canonical rollout name: the final checkpoint at the task's visibility has the short form."""
    if visibility == TASK_VISIBILITY[task] and int(update) == FINAL:
        return f"{task}__seed_{seed_tag(seed)}"
    return f"{task}__seed_{seed_tag(seed)}__{visibility}__update_{int(update):06d}"


def parse_rollout(name):
    """{task, seed (str), visibility, update (int)} of a rollout name; the short form is the final checkpoint."""
    m = re.fullmatch(r"(?P<task>social|non_social)__seed_(?P<seed>\d{4})(__(?P<vis>partial|none|full)__update_(?P<u>\d{6}))?",
                     name)
    if m is None:
        raise ValueError(f"not a rollout name: {name!r}")
    task = m["task"]
    if m["vis"] is None:
        return {"task": task, "seed": m["seed"], "visibility": TASK_VISIBILITY[task], "update": FINAL}
    if rollout_name(task, m["seed"], m["vis"], int(m["u"])) != name:
        raise ValueError(f"non-canonical rollout name {name!r}; use {task}__seed_{m['seed']}")
    return {"task": task, "seed": m["seed"], "visibility": m["vis"], "update": int(m["u"])}


def rollout_path(arch, name):
    return f"results/{arch}/paper_rollouts/{name}.safetensors"


def analysis_rollouts(arch, task, seed):
    """Rollouts that decoding and PLSC analyse: final + late checkpoints x the task's visibilities."""
    return [rollout_name(task, seed, v, u) for v in visibilities(task) for u in ANALYSIS_UPDATES]


def partner_rollouts(arch, task, seed):
    """Rollouts of the partner-representation analysis: every saved (or every analysed) checkpoint, own visibility."""
    return [rollout_name(task, seed, TASK_VISIBILITY[task], u) for u in PARTNER_UPDATES]


def derived(arch, kind, names, ext="csv"):
    return [f"results/{arch}/derived/{kind}/{n}.{ext}" for n in names]


def arch_analysis_rollouts(arch):
    return [n for _, t, s in units(arch) for n in analysis_rollouts(arch, t, s)]


def arch_partner_rollouts(arch):
    return [n for _, t, s in units(arch) for n in partner_rollouts(arch, t, s)]


# ------------------------------------------------------------------------------------------ input functions
def unit_checkpoints(wildcards):
    """Every checkpoint of a unit: update_000000 ... final, every train.checkpoint_every."""
    return [checkpoint_path(wildcards.arch, wildcards.task, wildcards.seed, u) for u in SAVED_UPDATES]


def unit_health(wildcards):
    return f"{unit_dir(wildcards.arch, wildcards.task, wildcards.seed)}/health.json"


def unit_eval_visibilities(wildcards):
    """None = the checkpoint's own visibility; the list when vision controls apply."""
    vis = visibilities(wildcards.task)
    return None if len(vis) == 1 else vis


def rollout_checkpoint_input(wildcards):
    r = parse_rollout(wildcards.rollout)
    return {
        "checkpoint": checkpoint_path(wildcards.arch, r["task"], r["seed"], r["update"]),
        "health": f"{unit_dir(wildcards.arch, r['task'], r['seed'])}/health.json",
    }


def rollout_labels(wildcards):
    r = parse_rollout(wildcards.rollout)
    return {"arch": wildcards.arch, "task": r["task"], "seed": r["seed"], "visibility": r["visibility"],
            "update": str(r["update"])}


def unit_labels(wildcards):
    return {"arch": wildcards.arch, "task": wildcards.task, "seed": wildcards.seed}


def arch_eval_inputs(wildcards):
    return [f"{unit_dir(a, t, s)}/random_eval.jsonl" for a, t, s in units(wildcards.arch)]


def arch_metrics(arch):
    return [f"{unit_dir(a, t, s)}/metrics.jsonl" for a, t, s in units(arch)]


def arch_table_inputs(wildcards):
    arch = wildcards.arch
    return {
        "eval_jsonl": f"results/{arch}/paper_random_eval.jsonl",
        "decoding": derived(arch, "decoding", arch_analysis_rollouts(arch)),
        "plsc": derived(arch, "plsc", arch_analysis_rollouts(arch)),
        "partner": derived(arch, "partner", arch_partner_rollouts(arch)),
        "dynamics": derived(arch, "dynamics", arch_analysis_rollouts(arch)),
        "perturbation": [f"results/{arch}/derived/perturbation/social__seed_{seed_tag(s)}.csv" for s in SEEDS],
    }


TABLES = ["behavior", "decoding", "plsc", "partner", "dynamics", "perturbation"]


def tables_dir(arch):
    return f"results/{arch}/derived/tables"


def arch_tables(arch):
    return [f"{tables_dir(arch)}/{t}.csv" for t in TABLES]


def manifest_inputs(wildcards):
    """Everything an architecture's results rest on (hashed into its manifest)."""
    arch = wildcards.arch
    names = sorted(set(arch_analysis_rollouts(arch)) | set(arch_partner_rollouts(arch)))
    social = [f"social__seed_{seed_tag(s)}" for s in SEEDS]
    return {
        "checkpoints": [checkpoint_path(a, t, s, FINAL) for a, t, s in units(arch)],
        "health": [f"{unit_dir(a, t, s)}/health.json" for a, t, s in units(arch)],
        "metrics": arch_metrics(arch),
        "unit_eval": arch_eval_inputs(wildcards),
        "rollouts": [rollout_path(arch, n) for n in names],
        "decoding": derived(arch, "decoding", arch_analysis_rollouts(arch)),
        "plsc": derived(arch, "plsc", arch_analysis_rollouts(arch)),
        "plsc_tensors": derived(arch, "plsc", arch_analysis_rollouts(arch), "safetensors"),
        "partner": derived(arch, "partner", arch_partner_rollouts(arch)),
        "dynamics": derived(arch, "dynamics", arch_analysis_rollouts(arch)),
        "perturbation": derived(arch, "perturbation", social),
        "perturbation_bases": [f"results/{arch}/derived/perturbation/{n}_bases.safetensors" for n in social],
    }


def manifest_outputs(wildcards):
    arch = wildcards.arch
    return {
        "eval_jsonl": f"results/{arch}/paper_random_eval.jsonl",
        "tables": arch_tables(arch),
        "report": f"results/{arch}/derived/reports/report.md",
    }


def cka_inputs(wildcards):
    return {
        "checkpoints": [checkpoint_path(a, "social", s, FINAL) for a in ARCHS for s in SEEDS],
        "rollouts": [rollout_path(a, f"social__seed_{seed_tag(s)}") for a in ARCHS for s in SEEDS],
    }


def cka_checkpoints_by_arch():
    return {a: [checkpoint_path(a, "social", s, FINAL) for s in SEEDS] for a in ARCHS}


def cka_rollouts_by_arch():
    return {a: [rollout_path(a, f"social__seed_{seed_tag(s)}") for s in SEEDS] for a in ARCHS}


def cross_inputs(wildcards):
    return {
        "tables": [f for a in ARCHS for f in arch_tables(a)],
        "metrics": [f for a in ARCHS for f in arch_metrics(a)],
        "cka_matrix": f"{CROSS}/cka_matrix.csv",
        "cka_pairs": f"{CROSS}/cka_pairs.csv",
    }


def final_targets():
    """The reports and manifests, and every rollout: Snakemake does not regenerate a missing intermediate file whose
    descendants exist, so the rollouts are named here; a deleted rollout is then rebuilt and its descendants rerun."""
    rollouts = sorted({rollout_path(a, n) for a in ARCHS for n in arch_analysis_rollouts(a) + arch_partner_rollouts(a)})
    return (
        [f"{CROSS}/report.md"]
        + [f"results/{a}/derived/reports/report.md" for a in ARCHS]
        + [f"results/{a}/manifest.json" for a in ARCHS]
        + rollouts
    )
