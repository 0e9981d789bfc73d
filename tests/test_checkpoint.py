"""Checkpoint format: round trip, clear errors on corrupt files, the public builder, health."""

import json

import pytest
import torch
from safetensors.torch import save_file

from interbrain.checkpoint import build_checkpoint, health, load_agents, load_checkpoint, read_metadata
from interbrain.config import make_train_config
from interbrain.errors import InterbrainError
from interbrain.train import Trainer


@pytest.fixture
def ckpt_path(tmp_path, tiny_overrides):
    tr = Trainer(make_train_config("rnn", "social", 3, "fast", 2, overrides=tiny_overrides), torch.device("cpu"))
    tr.step()
    path = tmp_path / "c.safetensors"
    from interbrain.checkpoint import save_checkpoint

    save_checkpoint(tr.to_checkpoint({"collisions_per_episode": 1.5}), path)
    return path, tr


def test_round_trip(ckpt_path):
    path, tr = ckpt_path
    ck = load_checkpoint(path)
    assert ck.update == 1 and ck.config == tr.config and ck.metrics == {"collisions_per_episode": 1.5}
    for agent in ("chaser", "explorer"):
        for k, v in tr.agents[agent].state_dict().items():
            assert torch.equal(ck.state_dict(agent)[k], v)
    meta = read_metadata(path)
    assert meta["format"] == "interbrain.checkpoint" and meta["schema_version"] == "1"
    assert json.loads(meta["param_counts"]) == {"chaser": 118533, "explorer": 118533}
    prov = json.loads(meta["provenance"])
    assert {"git_sha", "git_dirty", "packages", "device", "created_at"} <= set(prov)
    assert set(ck.optimizers) == {"chaser", "explorer"} and ck.optimizers["chaser"]["state"]
    assert {"env", "minibatch", "action.chaser", "action.explorer", "torch_cpu"} <= set(ck.rng)


def test_truncated_file_gives_one_line_error(ckpt_path, tmp_path):
    path, _ = ckpt_path
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InterbrainError, match=r"bad\.safetensors") as exc:
        load_checkpoint(bad)
    assert "\n" not in str(exc.value)
    assert not health(bad)["ok"]


def test_garbage_and_missing_and_foreign(tmp_path):
    g = tmp_path / "g.safetensors"
    g.write_bytes(b"\x00" * 64)
    with pytest.raises(InterbrainError, match="corrupt checkpoint .*g.safetensors"):
        load_checkpoint(g)
    with pytest.raises(InterbrainError, match="missing checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")
    foreign = tmp_path / "f.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(InterbrainError, match="format is 'something-else'"):
        load_checkpoint(foreign)


def test_nonfinite_tensor_is_refused_on_read(ckpt_path, tmp_path):
    path, _ = ckpt_path
    from safetensors.torch import load_file
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors["chaser.rnn.weight_hh_l0"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(InterbrainError, match="chaser.rnn.weight_hh_l0 is not finite"):
        load_checkpoint(bad)
    h = health(bad)
    assert not h["ok"] and h["nonfinite_count"] == 1 and h["tensor_count"] == len(tensors)


def test_build_checkpoint_from_plain_rnn_state_dicts(tmp_path):
    """External weights with the paper's names enter through the public builder, no pickle involved."""
    g = torch.Generator().manual_seed(0)
    shapes = {"rnn.weight_ih_l0": (256, 200), "rnn.weight_hh_l0": (256, 256), "rnn.bias_ih_l0": (256,),
              "rnn.bias_hh_l0": (256,), "action_head.weight": (4, 256), "action_head.bias": (4,),
              "value_head.weight": (1, 256), "value_head.bias": (1,)}
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    cfg = make_train_config("rnn", "social", 0, "paper", 20000)
    path = build_checkpoint(sd, sd, cfg, tmp_path / "ext.safetensors", update=20000)
    _, agents = load_agents(path)
    x = torch.zeros(1, 200)
    x[0, 17] = 1
    logits, value, h, _ = agents["chaser"].step(x, agents["chaser"].initial_state(1))
    h_ref = torch.relu(sd["rnn.weight_ih_l0"][:, 17] + sd["rnn.bias_ih_l0"] + sd["rnn.bias_hh_l0"])
    assert torch.allclose(h[0], h_ref, atol=1e-6)
    assert torch.allclose(logits[0], sd["action_head.weight"] @ h_ref + sd["action_head.bias"], atol=1e-6)
    wrong = dict(sd)
    wrong["rnn.weight_hh"] = wrong.pop("rnn.weight_hh_l0")
    with pytest.raises(InterbrainError, match="state dict does not fit arch 'rnn'"):
        build_checkpoint(wrong, sd, cfg, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
