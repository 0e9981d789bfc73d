"""Training loop: determinism, bit-exact resume, checkpoint schedule, metrics, refusal to resume a different run."""

import json

import pytest
import torch

from interbrain.agents.linear import onednn_available
from interbrain.checkpoint import load_checkpoint
from interbrain.errors import InterbrainError
from interbrain.train import train


def _weights(path):
    ck = load_checkpoint(path)
    return {f"{a}.{k}": v for a in ("chaser", "explorer") for k, v in ck.state_dict(a).items()}, ck


def _run(out, updates, overrides, arch="rnn", preset="fast", **kw):
    return train(arch, "social", 1, preset, updates, device="cpu", out=out, overrides=overrides,
                 checkpoint_every=kw.pop("checkpoint_every", 2), log_every=1, progress=False, **kw)


@pytest.mark.parametrize("arch,preset,kw", [
    ("rnn", "fast", {}), ("rnn", "paper", {}), ("rnn", "rllib", {}), ("gru", "fast", {}), ("lstm", "fast", {}),
    ("mingru", "fast", {}), ("minlstm", "fast", {}),
    # the disRNN warm-up ends after update 1, so the bottleneck noise (global torch RNG) crosses the resume
    ("disrnn", "fast", {"size": "matched", "agent_options": {"bottleneck_warmup": 1}}),
    ("tok_transformer", "fast", {"size": "matched"}),
])
def test_resume_is_bit_exact(tmp_path, tiny_overrides, arch, preset, kw):
    straight = _run(tmp_path / "a", 4, tiny_overrides, arch, preset, **kw)
    _run(tmp_path / "b", 2, tiny_overrides, arch, preset, **kw)
    resumed = _run(tmp_path / "b", 4, tiny_overrides, arch, preset, **kw)
    wa, ca = _weights(straight)
    wb, cb = _weights(resumed)
    assert ca.update == cb.update == 4
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for agent in ("chaser", "explorer"):
        for i, st in ca.optimizers[agent]["state"].items():
            for key, v in st.items():
                assert torch.equal(v, cb.optimizers[agent]["state"][i][key])
    assert ca.kl_coefs == cb.kl_coefs
    events = [json.loads(x)["event"] for x in (tmp_path / "b" / "events.jsonl").read_text().splitlines()]
    assert "resumed" in events
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["update"] for x in lines] == [1, 2, 3, 4]
    if arch == "disrnn":  # penalised from update 2 on
        aux = [x["learner"]["chaser"]["aux_loss"] for x in lines]
        assert aux[0] == 0.0 and all(a > 0 for a in aux[1:])


@pytest.mark.skipif(not onednn_available(), reason="needs two CPU backends")
def test_resume_under_another_cpu_backend_warns(tmp_path, tiny_overrides, cpu_matmul, capsys):
    """A resume under another CPU matmul backend (interbrain.agents.linear) cannot be bit for bit the uninterrupted
    run: it says so on stderr and in the resumed event; under the same backend it says nothing."""

    def resume_with(first: str, second: str, out):
        cpu_matmul(first)
        _run(out, 2, tiny_overrides, "mlp")
        cpu_matmul(second)
        capsys.readouterr()
        _run(out, 3, tiny_overrides, "mlp")
        events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
        return [e for e in events if e["event"] == "resumed"][-1], capsys.readouterr().err

    event, err = resume_with("torch", "onednn", tmp_path / "a")
    assert event["cpu_matmul"] == {"checkpoint": "torch", "now": "onednn"}
    assert "not bit for bit" in err
    event, err = resume_with("onednn", "onednn", tmp_path / "b")
    assert "cpu_matmul" not in event and "not bit for bit" not in err


def test_resume_under_another_small_step_backend_warns(tmp_path, tiny_overrides, small_matmul, capsys):
    """The same for the rllib learner's small-step kernel (torch's or numpy's BLAS, interbrain.agents.linear)."""
    small_matmul("torch")
    _run(tmp_path, 1, tiny_overrides, "rnn", "rllib")
    small_matmul("numpy")
    capsys.readouterr()
    _run(tmp_path, 2, tiny_overrides, "rnn", "rllib")
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"][-1]
    assert resumed["cpu_small_matmul"] == {"checkpoint": "torch", "now": "numpy"}
    assert "cpu_small_matmul 'numpy'" in capsys.readouterr().err
    small_matmul("numpy")  # an architecture without the stacked recurrence: the choice changes nothing, no warning
    _run(tmp_path / "mlp", 1, tiny_overrides, "mlp", "fast")
    small_matmul("torch")
    capsys.readouterr()
    _run(tmp_path / "mlp", 2, tiny_overrides, "mlp", "fast")
    events = [json.loads(x) for x in (tmp_path / "mlp" / "events.jsonl").read_text().splitlines()]
    assert "cpu_small_matmul" not in [e for e in events if e["event"] == "resumed"][-1]
    assert "not bit for bit" not in capsys.readouterr().err


def test_resume_on_another_vector_capability_warns(tmp_path, tiny_overrides, monkeypatch, capsys):
    """The rnn's rllib step products are compiled on AVX-512 processors and MKL's elsewhere
    (interbrain.agents.rnn_numpy): a resume where torch reports another CPU capability says so, as for the kernels."""
    def resumed_event():
        events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
        return [e for e in events if e["event"] == "resumed"][-1]

    _run(tmp_path, 1, tiny_overrides, "rnn", "rllib", checkpoint_every=1)
    capsys.readouterr()
    _run(tmp_path, 2, tiny_overrides, "rnn", "rllib", checkpoint_every=1)  # the same processor: nothing said
    assert "cpu_capability" not in resumed_event() and "not bit for bit" not in capsys.readouterr().err
    real = torch.backends.cpu.get_cpu_capability()
    other = "AVX2" if real != "AVX2" else "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other)
    _run(tmp_path, 3, tiny_overrides, "rnn", "rllib", checkpoint_every=1)
    assert resumed_event()["cpu_capability"] == {"checkpoint": real, "now": other}
    assert f"cpu_capability {other!r}" in capsys.readouterr().err


def test_same_seed_same_weights_and_schedule(tmp_path, tiny_overrides):
    a = _run(tmp_path / "a", 3, tiny_overrides)
    b = _run(tmp_path / "b", 3, tiny_overrides)
    wa, _ = _weights(a)
    wb, _ = _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names == ["latest.safetensors", "update_000000.safetensors", "update_000002.safetensors",
                     "update_000003.safetensors"]
    line = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("collisions_per_episode", "chaser_return", "explorer_return", "chaser_partner_in_view",
                "chaser_new_fields", "explorer_new_fields", "final_distance", "chaser_z_norm", "env_steps_per_s"):
        assert key in line
    for agent in ("chaser", "explorer"):
        assert {"policy_loss", "value_loss", "entropy", "approx_kl", "grad_norm"} <= set(line["learner"][agent])
        assert {"max_abs_param", "recurrent_norm", "kl_coef"} <= set(line["agents"][agent])


def test_social_and_non_social_start_from_identical_weights(tmp_path, tiny_overrides):
    from interbrain.config import make_train_config
    from interbrain.train import Trainer

    a = Trainer(make_train_config("rnn", "social", 5, "fast", 1), torch.device("cpu"))
    b = Trainer(make_train_config("rnn", "non_social", 5, "fast", 1), torch.device("cpu"))
    for agent in ("chaser", "explorer"):
        sa, sb = a.agents[agent].state_dict(), b.agents[agent].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_refuses_to_resume_a_different_run(tmp_path, tiny_overrides):
    _run(tmp_path / "a", 2, tiny_overrides)
    with pytest.raises(InterbrainError, match="lr"):
        _run(tmp_path / "a", 4, tiny_overrides | {"lr": 5e-4})


def test_nonfinite_fails_with_named_tensor_after_two_attempts(tmp_path, tiny_overrides, monkeypatch):
    import interbrain.train as tr

    original = tr.Trainer.step

    def poisoned(self):
        out = original(self)
        with torch.no_grad():
            self.agents["explorer"].value_head.bias.fill_(float("inf"))
        self.check_health()
        return out

    monkeypatch.setattr(tr.Trainer, "step", poisoned)
    with pytest.raises(InterbrainError, match=r"failed 2 attempts.*explorer\.value_head\.bias at update 1"):
        _run(tmp_path / "a", 2, tiny_overrides)
    events = [json.loads(x) for x in (tmp_path / "a" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("attempt_failed") == 2
    assert not (tmp_path / "a" / "checkpoints" / "latest.safetensors").exists()


def test_health_check_names_a_nonfinite_optimizer_state_by_its_parameter(tiny_overrides):
    from interbrain.config import make_train_config
    from interbrain.train import Trainer

    trainer = Trainer(make_train_config("rnn", "social", 1, "fast", 2, overrides=tiny_overrides), torch.device("cpu"))
    trainer.step()
    bias = trainer.agents["explorer"].value_head.bias
    trainer.optimizers["explorer"].state[bias]["exp_avg_sq"].fill_(float("nan"))
    with pytest.raises(InterbrainError, match=r"non-finite values in optimizer\.explorer\.value_head\.bias\.exp_avg_sq "
                                              r"at update 1$"):
        trainer.check_health()


def test_bad_output_dir_is_reported(tmp_path, tiny_overrides):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InterbrainError, match="cannot create output directory"):
        _run(blocker / "unit", 1, tiny_overrides)
