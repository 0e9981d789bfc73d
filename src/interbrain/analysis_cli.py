"""Analysis subcommands of the ``interbrain`` CLI: decode, plsc, partner, dynamics, cka, perturb.

Each reads analysis rollouts (``interbrain rollout``) or checkpoints and writes the versioned outputs documented in
docs/ARTIFACTS.md, by one call of the package function named in the help text.
"""

from __future__ import annotations


def _decode(args) -> int:
    from interbrain.analysis.decoding import decode_file

    print(decode_file(args.rollout, args.out, n_shuffles=args.shuffles, schemes=tuple(args.schemes.split(",")),
                      lag=args.lag, seed=args.seed))
    return 0


def _plsc(args) -> int:
    from interbrain.analysis.plsc import plsc_file

    print(plsc_file(args.rollout, args.out, args.tensors, n_null=args.null, min_shift=args.min_shift, seed=args.seed))
    return 0


def _partner(args) -> int:
    from interbrain.analysis.partner import partner_file

    print(partner_file(args.rollout, args.out, n_shifts=args.shifts, seed=args.seed))
    return 0


def _dynamics(args) -> int:
    from interbrain.analysis.dynamics import dynamics_file
    from interbrain.errors import InterbrainError

    if (args.rollout is None) == (args.rollout_opt is None):
        raise InterbrainError("give the rollout once: as the positional argument or as --rollout")
    print(dynamics_file(args.rollout or args.rollout_opt, args.out, l_min=args.l_min, l_max=args.l_max,
                        n_bins=args.bins, min_count=args.min_count))
    return 0


def _cka(args) -> int:
    from interbrain.analysis.cka import cka_study
    from interbrain.errors import InterbrainError

    def by_arch(items):
        out: dict[str, list] = {}
        for item in items:
            arch, sep, path = item.partition("=")
            if not sep:
                raise InterbrainError(f"expected ARCH=PATH, got {item!r}")
            out.setdefault(arch, []).append(path)
        return out

    cka_study(by_arch(args.checkpoint), by_arch(args.rollout), args.out_matrix, args.out_pairs,
              n_episodes=args.episodes, seed=args.seed, device=args.device)
    print(args.out_matrix)
    return 0


def _perturb(args) -> int:
    from interbrain.perturb import perturb_unit

    print(perturb_unit(args.checkpoint, args.rollout, args.out, args.bases, episodes=args.episodes, steps=args.steps,
                       seed=args.seed, opponent=args.opponent, k=args.k, device=args.device))
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("decode", help="event decoding with a linear SVM, episode-grouped folds (SPEC §6.1)")
    d.add_argument("rollout")
    d.add_argument("--out", required=True, help="output CSV")
    d.add_argument("--shuffles", type=int, default=200, help="shuffled-label controls")
    d.add_argument("--schemes", default="grouped,timestep", help="fold schemes: grouped (default), timestep (variant)")
    d.add_argument("--lag", type=int, default=0, choices=(0, 1))
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_decode)

    p = sub.add_parser("plsc", help="PLSC shared subspace, paper recipe + labelled variants (SPEC §6.2)")
    p.add_argument("rollout")
    p.add_argument("--out", required=True, help="output CSV (one row per variant)")
    p.add_argument("--tensors", required=True, help="output safetensors (singular values, null quantiles, bases)")
    p.add_argument("--null", type=int, default=2000, help="circular-shift null draws")
    p.add_argument("--min-shift", type=int, default=31, help="31 = the official rule; 60 = the reproduction's")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_plsc)

    r = sub.add_parser("partner", help="partner representation in the neural action space (SPEC §6.5)")
    r.add_argument("rollout")
    r.add_argument("--out", required=True, help="output CSV")
    r.add_argument("--shifts", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_partner)

    y = sub.add_parser("dynamics", help="phase portrait of each agent's action preference and its fixed points "
                                        "(tiny-RNN style, protocol dynamics_v1)")
    y.add_argument("rollout", nargs="?", default=None)
    y.add_argument("--rollout", dest="rollout_opt", default=None, metavar="ROLLOUT",
                   help="the analysis rollout (alternative to the positional argument)")
    y.add_argument("--out", required=True, help="output CSV (summary, bin and fixed_point rows per agent x event)")
    y.add_argument("--l-min", type=float, default=-10.0, help="lower edge of the preference grid")
    y.add_argument("--l-max", type=float, default=10.0, help="upper edge of the preference grid")
    y.add_argument("--bins", type=int, default=40, help="equal bins over [l-min, l-max]")
    y.add_argument("--min-count", type=int, default=10, help="pairs a bin needs to enter the fixed-point search")
    y.set_defaults(func=_dynamics)

    c = sub.add_parser("cka", help="linear CKA between chaser networks on a balanced common probe (SPEC §6.4)")
    c.add_argument("--checkpoint", action="append", required=True, metavar="ARCH=PATH", help="repeat per network")
    c.add_argument("--rollout", action="append", required=True, metavar="ARCH=PATH", help="probe sources, repeat")
    c.add_argument("--out-matrix", required=True)
    c.add_argument("--out-pairs", required=True)
    c.add_argument("--episodes", type=int, default=24)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.set_defaults(func=_cka)

    q = sub.add_parser("perturb", help="remove the shared PLSC subspace from the chaser; controls (SPEC §6.6)")
    q.add_argument("checkpoint")
    q.add_argument("--rollout", required=True, help="the unit's final-checkpoint analysis rollout (fits the bases)")
    q.add_argument("--out", required=True, help="output CSV (per condition x target x episode)")
    q.add_argument("--bases", required=True, help="output safetensors with the bases")
    q.add_argument("--episodes", type=int, default=100)
    q.add_argument("--steps", type=int, default=100)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--opponent", default="random", help="random (default) | trained")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--device", default="auto")
    q.set_defaults(func=_perturb)
