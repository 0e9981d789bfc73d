"""The `interbrain` CLI end to end on a tiny unit: train -> health -> evaluate -> rollout -> decode / plsc / partner /
perturb / cka, every output checked against its documented schema (docs/ARTIFACTS.md); bad input gives one line and
exit status 2 with nothing written."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from interbrain.analysis.decoding import DECODING_FIELDS, IDENTITY_FIELDS
from interbrain.evaluate import RECORD_FIELDS
from interbrain.rollout import load_rollout

CLI = [sys.executable, "-m", "interbrain"]


def run(*args, ok=True):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    out = tmp_path_factory.mktemp("unit")
    run("train", "--arch", "rnn", "--task", "social", "--seed", "0", "--preset", "fast", "--updates", "2",
        "--checkpoint-every", "1", "--log-every", "1", "--out", out, "--device", "cpu", "--set", "num_envs=4", "--quiet")
    return out


def test_chain_outputs_follow_their_schemas(unit, tmp_path):
    ckpt = unit / "checkpoints/latest.safetensors"
    health = json.loads(run("health", ckpt).stdout)
    assert health["ok"] and health["nonfinite_count"] == 0

    run("evaluate", unit / "checkpoints/update_000001.safetensors", ckpt, "--out", tmp_path / "ev.jsonl",
        "--episodes", "5", "--device", "cpu")
    records = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(set(RECORD_FIELDS) <= set(r) and r["status"] == "ok" for r in records)
    assert {r["update"] for r in records} == {1, 2}

    ro = tmp_path / "ro.safetensors"
    run("rollout", ckpt, "--out", ro, "--episodes", "6", "--steps", "500", "--device", "cpu")
    data, meta = load_rollout(ro)
    assert data["chaser_hidden"].shape == (500, 6, 256) and data["chaser_pos"].shape == (501, 6, 2)
    assert meta["protocol"] == "analysis_selfplay_v1" and meta["schema_version"] == 1 and "alignment" in meta

    run("decode", ro, "--out", tmp_path / "d.csv", "--shuffles", "3")
    assert list(pd.read_csv(tmp_path / "d.csv").columns) == list(DECODING_FIELDS)
    run("plsc", ro, "--out", tmp_path / "p.csv", "--tensors", tmp_path / "p.safetensors", "--null", "20")
    plsc = pd.read_csv(tmp_path / "p.csv")
    assert list(plsc.columns[: len(IDENTITY_FIELDS)]) == list(IDENTITY_FIELDS)
    assert {"variant", "k_star", "r1", "delta_pcc", "p_value"} <= set(plsc.columns) and len(plsc) == 6
    run("partner", ro, "--out", tmp_path / "r.csv", "--shifts", "2")
    assert {"partner", "r2_full", "contribution_partner_position"} <= set(pd.read_csv(tmp_path / "r.csv").columns)
    run("dynamics", ro, "--out", tmp_path / "dyn.csv")
    dyn = pd.read_csv(tmp_path / "dyn.csv")
    assert {"summary", "bin"} <= set(dyn["kind"]) and set(dyn["agent"]) == {"chaser", "explorer"}
    run("perturb", ckpt, "--rollout", ro, "--out", tmp_path / "q.csv", "--bases", tmp_path / "b.safetensors",
        "--episodes", "4", "--steps", "20", "--k", "2", "--device", "cpu")
    pert = pd.read_csv(tmp_path / "q.csv")
    from interbrain.perturb import FIELDS

    assert list(pert.columns) == list(FIELDS)
    if (pert["status"] == "ok").all():
        base = pert[pert["condition"] == "baseline"]
        assert (base["delta_collisions"] == 0).all() and set(pert["target"]) == {"readout", "recurrent"}
    proc = run("cka", "--checkpoint", f"rnn={ckpt}", "--checkpoint",
               f"rnn={unit / 'checkpoints/update_000000.safetensors'}", "--rollout", f"rnn={ro}", "--out-matrix",
               tmp_path / "m.csv", "--out-pairs", tmp_path / "c.csv", "--episodes", "2", ok=False)
    assert proc.returncode == 2 and "two rnn networks with seed 0" in proc.stderr  # CKA pairs need distinct seeds
    assert not (tmp_path / "m.csv").exists()


def test_train_agent_options_reach_the_checkpoint(tmp_path):
    from interbrain.checkpoint import load_checkpoint

    run("train", "--arch", "disrnn", "--preset", "fast", "--updates", "1", "--checkpoint-every", "1", "--out", tmp_path,
        "--device", "cpu", "--set", "num_envs=2", "--agent-set", "bottleneck_beta=0.003", "--agent-set",
        "bottleneck_warmup=7", "--quiet")
    agent = load_checkpoint(tmp_path / "checkpoints" / "latest.safetensors").config.agent
    assert (agent.arch, agent.bottleneck_beta, agent.bottleneck_warmup) == ("disrnn", 0.003, 7)


def test_train_ensemble_writes_one_unit_folder_per_task_and_seed(tmp_path):
    from interbrain.checkpoint import load_checkpoint

    proc = run("train-ensemble", "--preset", "fast", "--updates", "1", "--checkpoint-every", "1", "--seeds", "3", "4",
               "--out", f"{tmp_path}/{{arch}}/{{task}}/seed_{{seed:04d}}", "--device", "cpu", "--set", "num_envs=2",
               "--quiet")
    printed = proc.stdout.split()
    assert len(printed) == 4
    for task in ("social", "non_social"):
        for seed in (3, 4):
            path = tmp_path / "rnn" / task / f"seed_{seed:04d}" / "checkpoints" / "latest.safetensors"
            assert str(path) in printed
            ck = load_checkpoint(path)
            assert (ck.config.env.task, ck.config.seed, ck.update) == (task, seed, 1)


@pytest.mark.parametrize("args,needle", [
    (["train-ensemble", "--arch", "mlp", "--seeds", "0", "--out", "{tmp}/u/{{task}}/{{seed}}"],
     "arch 'mlp' cannot train as an ensemble"),
    (["train-ensemble", "--seeds", "0", "1", "--out", "{tmp}/u/{{task}}"], "gives several units the same folder"),
    (["train", "--arch", "lstm9", "--out", "{tmp}/u"], "unknown arch 'lstm9'"),
    (["train", "--task", "party", "--out", "{tmp}/u"], "unknown task 'party'"),
    (["train", "--updates", "0", "--out", "{tmp}/u"], "updates must be a positive integer"),
    (["train", "--set", "lrr=1", "--out", "{tmp}/u"], "unknown learner setting 'lrr'"),
    (["train", "--arch", "disrnn", "--agent-set", "beta=1", "--out", "{tmp}/u"], "unknown agent option 'beta'"),
    (["train", "--arch", "disrnn", "--agent-set", "bottleneck_beta=-1", "--out", "{tmp}/u"],
     "bottleneck_beta must be a finite non-negative number, got -1"),
    (["evaluate", "{tmp}/missing.safetensors", "--out", "{tmp}/ev.jsonl"], "missing checkpoint"),
    (["rollout", "{tmp}/missing.safetensors", "--out", "{tmp}/r.safetensors"], "missing checkpoint"),
    (["decode", "{tmp}/missing.safetensors", "--out", "{tmp}/d.csv"], "missing rollout"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, needle):
    proc = run(*[a.format(tmp=tmp_path) for a in args], ok=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "u").exists() and not (tmp_path / "d.csv").exists()
    assert not (tmp_path / "r.safetensors").exists()
