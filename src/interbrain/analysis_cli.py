"""Analysis subcommands of the ``interbrain`` CLI (decode, plsc, cka, partner, perturb)."""


def add_parsers(sub) -> None:
    return None
