"""The batched ensemble (interbrain.ensemble): the same units, the same numbers as training each unit alone."""

import json

import pytest
import torch

from interbrain.agents.rnn import ReluRNNHeads, StackedReluRNNHeads
from interbrain.checkpoint import load_checkpoint
from interbrain.config import make_train_config
from interbrain.ensemble import EnsembleTrainer, check_ensemble, train_ensemble
from interbrain.errors import InterbrainError, NonFiniteError
from interbrain.train import Trainer, train_config

UNITS = [("social", 0), ("non_social", 1), ("social", 2)]  # mixed tasks (and visibilities) and seeds


def _config(task, seed, updates=3, preset="fast", **kw):
    return make_train_config("rnn", task, seed, preset, updates, overrides={"num_envs": 8}, checkpoint_every=2,
                             log_every=1, **kw)


def _close(a, b, tol=1e-5):
    return torch.allclose(a, b, rtol=tol, atol=tol)


def _near(got, want, scale, tol=1e-3):
    """||got - want|| <= tol * ||scale||: float-order differences only. Adam divides each gradient entry by its own
    running size, so entries whose gradient is ~0 can move by up to lr on rounding alone; a real error (a wrong
    clip, shared state, a swapped unit) moves the weights by the size of the learned change itself."""
    return float((got - want).norm()) <= tol * float(scale.norm()) + 1e-7


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_ensemble_equals_each_unit_trained_alone(preset):
    """Three updates: every unit's rollout and learner stats, weights and Adam moments match its plain trainer."""
    cpu = torch.device("cpu")
    plain = [Trainer(_config(t, s, preset=preset), cpu) for t, s in UNITS]
    members = [Trainer(_config(t, s, preset=preset), cpu) for t, s in UNITS]
    init = [{r: {n: w.detach().clone() for n, w in p.agents[r].named_parameters()} for r in p.agents} for p in plain]
    ens = EnsembleTrainer(members)
    for _ in range(3):
        alone = [p.step() for p in plain]
        together = ens.step()
        for a, b in zip(alone, together):
            assert a["rollout"] == pytest.approx(b["rollout"], rel=1e-5, abs=1e-6)  # same actions, same episodes
            for role in ("chaser", "explorer"):
                assert a["learner"][role] == pytest.approx(b["learner"][role], rel=1e-4, abs=1e-5)
    ens.sync()
    for p, m, w0 in zip(plain, members, init):
        assert m.update == p.update == 3
        for role in ("chaser", "explorer"):
            mine = dict(m.agents[role].named_parameters())
            for name, w in p.agents[role].named_parameters():
                assert _near(mine[name].detach(), w.detach(), w.detach() - w0[role][name]), (role, name)
                ps, ms = p.optimizers[role].state[w], m.optimizers[role].state[mine[name]]
                assert float(ps["step"]) == float(ms["step"]) == 3 * p.config.ppo.epochs
                assert _near(ms["exp_avg"], ps["exp_avg"], ps["exp_avg"])
                assert _near(ms["exp_avg_sq"], ps["exp_avg_sq"], ps["exp_avg_sq"])
    # the units really differ from each other (a shared-weights bug would make them equal)
    w0, w2 = (dict(m.agents["chaser"].named_parameters())["rnn.weight_hh_l0"] for m in (members[0], members[2]))
    assert not torch.allclose(w0, w2)


def test_batched_recurrence_equals_the_per_unit_recurrence():
    """Forward and all five gradients of StackedReluRNNHeads (the stacked learning pass: recurrence and joint heads, E
    units, unit-major rows, from given initial states) equal ReluRNNHeads run unit by unit, with a loss on both the
    heads and the hidden states."""
    g = torch.Generator().manual_seed(0)
    T, E, B, H, K = 7, 3, 5, 16, 5
    pre = torch.randn(E, T, B, H, generator=g, requires_grad=True)
    h0 = torch.randn(E, B, H, generator=g, requires_grad=True)
    w = (torch.randn(E, H, H, generator=g) * 0.3).requires_grad_()
    head_w = torch.randn(E, K, H, generator=g, requires_grad=True)
    head_b = torch.randn(E, K, generator=g, requires_grad=True)
    w_hidden, w_heads = torch.randn(E, T, B, H, generator=g), torch.randn(E, T, B, K, generator=g)
    out, heads = StackedReluRNNHeads.apply(pre.reshape(-1, H), h0, w, head_w, head_b, T)
    ((out * w_hidden).sum() + (heads.view(E, T, B, K) * w_heads).sum()).backward()
    for e in range(E):
        p, h, ww, hw, hb = (x.detach()[e].clone().requires_grad_() for x in (pre, h0, w, head_w, head_b))
        ref, ref_heads = ReluRNNHeads.apply(p.reshape(-1, H).clone(), h, ww, hw, hb, T, None)
        ((ref.view(T, B, H) * w_hidden[e]).sum() + (ref_heads.view(T, B, K) * w_heads[e]).sum()).backward()
        assert torch.allclose(out[e], ref.view(T, B, H), atol=1e-5)
        assert torch.allclose(heads[e], ref_heads, atol=1e-5)
        assert torch.allclose(pre.grad[e], p.grad, atol=1e-5)
        assert torch.allclose(h0.grad[e], h.grad, atol=1e-5)
        assert torch.allclose(w.grad[e], ww.grad, atol=1e-4)
        assert torch.allclose(head_w.grad[e], hw.grad, atol=1e-4)
        assert torch.allclose(head_b.grad[e], hb.grad, atol=1e-5)
    assert (out == 0).any() and (out > 0).any()  # both ReLU branches exercised


def test_train_ensemble_writes_each_units_plain_outputs_and_resumes(tmp_path):
    """train_ensemble to update 2, then resumed to 4, leaves in each unit's folder what train_config writes."""
    configs = [_config(t, s, updates=4) for t, s in UNITS]
    outs = [tmp_path / "ens" / f"u{i}" for i in range(len(UNITS))]
    short = [_config(t, s, updates=2) for t, s in UNITS]
    train_ensemble(short, outs, device="cpu", progress=False)
    latest = train_ensemble(configs, outs, device="cpu", progress=False)
    for cfg, out, path in zip(configs, outs, latest):
        alone = train_config(cfg, device="cpu", out=tmp_path / "alone" / out.name, progress=False)
        a, b = load_checkpoint(alone), load_checkpoint(path)
        assert a.update == b.update == 4 and b.config.to_dict() == cfg.to_dict()
        start = load_checkpoint(out / "checkpoints" / "update_000000.safetensors")
        for role in ("chaser", "explorer"):
            sa, sb, s0 = a.state_dict(role), b.state_dict(role), start.state_dict(role)
            assert all(_near(sb[k], sa[k], sa[k] - s0[k]) for k in sa), role
        for key in ("env", "action.chaser", "action.explorer"):  # the units' own streams, advanced as alone
            assert torch.equal(a.rng[key], b.rng[key])
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == ["latest.safetensors", "update_000000.safetensors", "update_000002.safetensors",
                         "update_000004.safetensors"]
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [x["update"] for x in lines] == [1, 2, 3, 4]
        events = [json.loads(x)["event"] for x in (out / "events.jsonl").read_text().splitlines()]
        assert "resumed" in events and events[-1] == "attempt_completed"


def test_units_that_cannot_share_an_ensemble_are_refused():
    with pytest.raises(InterbrainError, match="arch 'mlp' cannot train as an ensemble"):
        check_ensemble([make_train_config("mlp", "social", 0, "fast", 2)])
    with pytest.raises(InterbrainError, match="rllib learner"):
        check_ensemble([make_train_config("rnn", "social", 0, "rllib", 2)])
    with pytest.raises(InterbrainError, match="appears twice"):
        check_ensemble([_config("social", 0), _config("social", 0)])
    with pytest.raises(InterbrainError, match=r"setting ppo\.lr"):
        check_ensemble([_config("social", 0), make_train_config("rnn", "social", 1, "fast", 3, checkpoint_every=2,
                                                                 log_every=1, overrides={"num_envs": 8, "lr": 5e-4})])
    with pytest.raises(InterbrainError, match="needs 2 output folders"):
        train_ensemble([_config("social", 0), _config("social", 1)], ["a"], device="cpu")


def test_a_non_finite_unit_is_named():
    members = [Trainer(_config(t, s), torch.device("cpu")) for t, s in UNITS]
    with torch.no_grad():
        members[1].agents["explorer"].value_head.bias.fill_(float("nan"))
    ens = EnsembleTrainer(members)
    with pytest.raises(NonFiniteError, match=r"explorer\.values of unit rnn/non_social/seed_0001 at update 1"):
        ens.step()


def test_units_at_different_updates_train_as_one_ensemble_per_resume_point(tmp_path):
    """One unit already trained to 2 updates, one fresh: both end at 4 with the weights each gets alone."""
    configs = [_config("social", 0, updates=4), _config("non_social", 1, updates=4)]
    outs = [tmp_path / "a", tmp_path / "b"]
    train_config(_config("social", 0, updates=2), device="cpu", out=outs[0], progress=False)
    latest = train_ensemble(configs, outs, device="cpu", progress=False)
    for cfg, path in zip(configs, latest):
        alone = load_checkpoint(train_config(cfg, device="cpu", out=tmp_path / "alone" / cfg.env.task, progress=False))
        got, start = load_checkpoint(path), load_checkpoint(path.parent / "update_000000.safetensors")
        assert got.update == 4
        for role in ("chaser", "explorer"):
            sa, sb, s0 = alone.state_dict(role), got.state_dict(role), start.state_dict(role)
            assert all(_near(sb[k], sa[k], sa[k] - s0[k]) for k in sa), role
    sizes = [json.loads(x).get("ensemble_size") for x in (outs[0] / "events.jsonl").read_text().splitlines()]
    assert [s for s in sizes if s] == [1]  # the resumed unit trained alone from update 2 (the fresh one from 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ensemble_on_cuda_equals_each_unit_alone_on_cuda():
    cuda = torch.device("cuda")
    plain = [Trainer(_config(t, s), cuda) for t, s in UNITS]
    ens = EnsembleTrainer([Trainer(_config(t, s), cuda) for t, s in UNITS])
    for _ in range(2):
        alone = [p.step() for p in plain]
        for a, b in zip(alone, ens.step()):
            assert a["rollout"] == pytest.approx(b["rollout"], rel=1e-4, abs=1e-5)


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(InterbrainError, match="cuda_graphs=True needs a CUDA device; the units are on cpu"):
        EnsembleTrainer([Trainer(_config(t, s), torch.device("cpu")) for t, s in UNITS], cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_ensemble_cuda_graphs_equal_the_eager_ensemble(preset):
    """The captured acting loop and learning epochs (replayed from the second update on; ``paper`` replays the
    learning graph four times per update, so its gradients must be overwritten, not accumulated) give the eager
    ensemble's numbers on the same GPU."""
    cuda = torch.device("cuda")
    eager = EnsembleTrainer([Trainer(_config(t, s, updates=4, preset=preset), cuda) for t, s in UNITS],
                            cuda_graphs=False)
    graphed = EnsembleTrainer([Trainer(_config(t, s, updates=4, preset=preset), cuda) for t, s in UNITS])
    assert graphed.cuda_graphs and not eager.cuda_graphs
    for _ in range(4):
        for a, b in zip(eager.step(), graphed.step()):
            assert a["rollout"] == pytest.approx(b["rollout"], rel=1e-5, abs=1e-6)
            for role in ("chaser", "explorer"):
                assert a["learner"][role] == pytest.approx(b["learner"][role], rel=1e-4, abs=1e-5)
    assert graphed._acting_graph is not None and graphed._learning_graph is not None
    for role in ("chaser", "explorer"):
        for (name, w), v in zip(eager.stacks[role].named_parameters(), graphed.stacks[role].parameters()):
            assert _close(w, v, 1e-5), (role, name)
