"""rule train: interbrain.train.train on {unit}/train_work, then publish the declared outputs.

The learner's working directory is not a Snakemake output, so a killed or failed job leaves it in place and the
rerun resumes from its newest healthy checkpoint (SPEC §4.6). Only a completed run publishes: each checkpoint is
hard-linked (copied where links are impossible) into {unit}/checkpoints/, metrics.jsonl and events.jsonl are copied.
Every publication is atomic (temporary name, then rename).
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from wfcommon import as_list, job


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


with job(snakemake) as sm:
    from interbrain.checkpoint import health, load_checkpoint, read_metadata
    from interbrain.config import make_train_config
    from interbrain.errors import InterbrainError
    from interbrain.train import train_config

    p = sm.params
    work = Path(p.work)
    wanted = make_train_config(p.arch, p.task, p.seed, p.preset, p.updates, size=p.size, init=p.init, spawn=p.spawn,
                               window=p.window, pos=p.pos, checkpoint_every=p.checkpoint_every,
                               log_every=p.log_every, overrides=dict(p.overrides),
                               agent_options=dict(p.agent_options))
    # The working copy is reused only if every checkpoint in it is healthy and was trained with these settings;
    # otherwise the unit is retrained from scratch (training is deterministic, so nothing else changes).
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
        print(f"retraining {p.arch}/{p.task}/seed_{p.seed:04d} from scratch: {stale}", file=sys.stderr)
        shutil.rmtree(work)
    train_config(wanted, device=p.device, out=work, progress=True, threads=sm.threads)

    ckpt_dir = work / "checkpoints"
    latest = ckpt_dir / "latest.safetensors"
    reached = int(read_metadata(latest)["update"])
    if reached != p.updates:
        raise InterbrainError(f"{latest} is at update {reached}, not train.updates={p.updates}: {work} holds a longer "
                              f"run; delete {work} to retrain this unit")
    for out in as_list(sm.output.checkpoints) + [sm.output.latest]:
        src = ckpt_dir / Path(out).name
        if not src.is_file():
            raise InterbrainError(f"{src} missing after training (was {work} trained with another checkpoint_every?); "
                                  f"delete {work} to retrain this unit")
        publish(src, Path(out), link=True)
    publish(work / "metrics.jsonl", Path(sm.output.metrics), link=False)
    publish(work / "events.jsonl", Path(sm.output.events), link=False)
    print(f"published {len(as_list(sm.output.checkpoints))} checkpoints of {p.arch}/{p.task}/seed_{p.seed:04d}")
