"""``interbrain`` command line. Each subcommand is one call of a package function.

Errors the user can fix (a bad value, a missing or corrupt file) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from interbrain.errors import InterbrainError


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InterbrainError(f"override {text!r} must look like key=value")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key, parsed


def _unit_config(args, task: str, seed: int):
    """The TrainConfig of one unit from the arguments shared by ``train`` and ``train-ensemble``."""
    from interbrain.config import make_train_config

    return make_train_config(args.arch, task, seed, args.preset, args.updates, size=args.size, init=args.init,
                             spawn=args.spawn, window=args.window, pos=args.pos,
                             checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                             latest_every_s=args.latest_every_s,
                             overrides=dict(_parse_override(o) for o in args.set or []),
                             agent_options=dict(_parse_override(o) for o in args.agent_set or []))


def _cmd_train(args) -> int:
    from interbrain.train import train_config

    print(train_config(_unit_config(args, args.task, args.seed), device=args.device, out=args.out,
                       progress=not args.quiet, threads=args.threads))
    return 0


def _cmd_train_ensemble(args) -> int:
    from interbrain.ensemble import check_ensemble, train_ensemble

    configs, outs = [], []
    for task in args.tasks:
        for seed in args.seeds:
            configs.append(_unit_config(args, task, seed))
            try:
                outs.append(args.out.format(arch=args.arch, task=task, seed=seed))
            except (KeyError, IndexError, ValueError) as exc:
                raise InterbrainError(f"--out {args.out!r} is not a valid pattern ({exc!r}); use {{arch}}, {{task}}, "
                                      "{seed}") from None
    check_ensemble(configs)
    if len(set(outs)) != len(outs):
        raise InterbrainError(f"--out {args.out!r} gives several units the same folder; use {{task}} and {{seed}}")
    for latest in train_ensemble(configs, outs, device=args.device, progress=not args.quiet, threads=args.threads):
        print(latest)
    return 0


def _add_unit_arguments(t: argparse.ArgumentParser) -> None:
    """The settings of a training unit, shared by ``train`` and ``train-ensemble``."""
    t.add_argument("--arch", default="rnn")
    t.add_argument("--preset", default="paper", help="paper (default) | fast | rllib")
    t.add_argument("--updates", type=int, default=20_000)
    t.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    t.add_argument("--size", default="std")
    t.add_argument("--init", default="pytorch_default")
    t.add_argument("--spawn", default="full")
    t.add_argument("--window", type=int, default=100, help="attention window = training horizon (transformer)")
    t.add_argument("--pos", default="learned")
    t.add_argument("--checkpoint-every", type=int, default=1_000)
    t.add_argument("--log-every", type=int, default=500)
    t.add_argument("--latest-every-s", type=float, default=1_800.0)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a learner setting, e.g. lr=1e-3")
    t.add_argument("--agent-set", action="append", metavar="KEY=VALUE",
                   help="an architecture setting (disrnn: bottleneck_beta, bottleneck_warmup; tok_transformer: "
                        "tok_compute, tok_mode, tok_type_embedding), e.g. bottleneck_beta=1e-3")
    t.add_argument("--quiet", action="store_true", help="no progress output")


def _cmd_health(args) -> int:
    from interbrain.checkpoint import health

    records = [health(p) for p in args.checkpoints]
    for r in records:
        print(json.dumps(r))
    return 0 if all(r["ok"] for r in records) else 1


def _cmd_evaluate(args) -> int:
    from interbrain.evaluate import evaluate_checkpoint

    for ckpt in args.checkpoints:
        for r in evaluate_checkpoint(ckpt, args.out, episodes=args.episodes, steps=args.steps, seed=args.seed,
                                     visibility=args.visibility, device=args.device, force=args.force):
            m = r["metrics"] or {}
            print(f"{r['unit_id']} update {r['update']} {r['matchup']}: status {r['status']}, "
                  f"collisions/episode {m.get('collisions_per_episode', float('nan')):.2f}")
    return 0


def _cmd_rollout(args) -> int:
    from interbrain.rollout import rollout_checkpoint

    print(rollout_checkpoint(args.checkpoint, args.out, episodes=args.episodes, steps=args.steps, seed=args.seed,
                             visibility=args.visibility, opponent=args.opponent, device=args.device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from interbrain import __version__

    p = argparse.ArgumentParser(prog="interbrain", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"interbrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one chaser/explorer pair with independent PPO")
    _add_unit_arguments(t)
    t.add_argument("--task", default="social")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="unit directory (checkpoints/, metrics.jsonl, events.jsonl)")
    t.set_defaults(func=_cmd_train)

    en = sub.add_parser("train-ensemble", help="train several units of one architecture (tasks x seeds) as one "
                                               "batched ensemble; rnn, presets paper/fast")
    _add_unit_arguments(en)
    en.add_argument("--tasks", nargs="+", default=["social", "non_social"])
    en.add_argument("--seeds", nargs="+", type=int, required=True)
    en.add_argument("--out", required=True, metavar="PATTERN",
                    help="each unit's directory, e.g. 'results/{arch}/{task}/seed_{seed:04d}'")
    en.set_defaults(func=_cmd_train_ensemble)

    h = sub.add_parser("health", help="check checkpoints load and hold only finite tensors")
    h.add_argument("checkpoints", nargs="+")
    h.set_defaults(func=_cmd_health)

    e = sub.add_parser("evaluate", help="random-opponent evaluation (protocol random_opponent_v1), appends JSONL")
    e.add_argument("checkpoints", nargs="+")
    e.add_argument("--out", required=True, help="JSONL file to append records to")
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--steps", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--visibility", default=None, help="override: partial | none | full (non-social vision controls)")
    e.add_argument("--device", default="auto")
    e.add_argument("--force", action="store_true", help="re-evaluate records that are already ok")
    e.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser("rollout", help="analysis rollout with hidden states (protocol analysis_selfplay_v1)")
    r.add_argument("checkpoint")
    r.add_argument("--out", required=True, help="output .safetensors")
    r.add_argument("--episodes", type=int, default=25)
    r.add_argument("--steps", type=int, default=500)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--visibility", default=None)
    r.add_argument("--opponent", default="trained", help="trained (self-play, default) | random")
    r.add_argument("--device", default="auto")
    r.set_defaults(func=_cmd_rollout)

    from interbrain import analysis_cli

    analysis_cli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InterbrainError as exc:
        print(f"interbrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interbrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
