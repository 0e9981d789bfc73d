"""A training unit's working folder and the publication of its outputs, shared by the `train` and `train_ensemble`
scripts.

The learner works in {unit}/train_work, which is not a Snakemake output, so a killed or failed job leaves it in
place and the rerun resumes from its newest healthy checkpoint (SPEC §4.6). Only a completed run publishes: each
checkpoint is hard-linked (copied where links are impossible) into {unit}/checkpoints/, metrics.jsonl and
events.jsonl are copied. Every publication is atomic (temporary name, then rename).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path


def publish(src: Path, dst: Path, *, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        if link:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        else:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def wanted_config(p, task: str, seed: int):
    """The unit's TrainConfig from the rule's params."""
    from interbrain.config import make_train_config

    return make_train_config(p.arch, task, seed, p.preset, p.updates, size=p.size, init=p.init, spawn=p.spawn,
                             window=p.window, pos=p.pos, checkpoint_every=p.checkpoint_every, log_every=p.log_every,
                             overrides=dict(p.overrides), agent_options=dict(p.agent_options))


def clear_stale_work(work: Path, wanted) -> None:
    """The working copy is reused only if every checkpoint in it is healthy and was trained with these settings;
    otherwise the unit is retrained from scratch (training is deterministic, so nothing else changes)."""
    from interbrain.checkpoint import health, load_checkpoint

    stale = None
    for ckpt in sorted((work / "checkpoints").glob("*.safetensors")):
        record = health(ckpt)
        if not record["ok"]:
            stale = f"damaged checkpoint ({record['error']})"
            break
        if load_checkpoint(ckpt).config.learning_identity() != wanted.learning_identity():
            stale = f"{ckpt.name} was trained with other learning settings"
            break
    if stale:
        print(f"retraining {wanted.unit_id} from scratch: {stale}", file=sys.stderr)
        shutil.rmtree(work)


def publish_unit(work: Path, updates: int, checkpoints: list[str], latest: str, metrics: str, events: str) -> None:
    """Check the working copy reached ``updates`` and publish its declared outputs."""
    from interbrain.checkpoint import read_metadata
    from interbrain.errors import InterbrainError

    ckpt_dir = work / "checkpoints"
    src_latest = ckpt_dir / "latest.safetensors"
    reached = int(read_metadata(src_latest)["update"])
    if reached != updates:
        raise InterbrainError(f"{src_latest} is at update {reached}, not train.updates={updates}: {work} holds a "
                              f"longer run; delete {work} to retrain this unit")
    for out in list(checkpoints) + [latest]:
        src = ckpt_dir / Path(out).name
        if not src.is_file():
            raise InterbrainError(f"{src} missing after training (was {work} trained with another checkpoint_every?); "
                                  f"delete {work} to retrain this unit")
        publish(src, Path(out), link=True)
    publish(work / "metrics.jsonl", Path(metrics), link=False)
    publish(work / "events.jsonl", Path(events), link=False)
    print(f"published {len(checkpoints)} checkpoints of {work.parent}")
