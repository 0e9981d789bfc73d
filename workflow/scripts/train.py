"""rule train: interbrain.train.train_config on {unit}/train_work, then publish the declared outputs
(see unit_work.py: only a completed run publishes, atomically)."""

from pathlib import Path

from unit_work import clear_stale_work, publish_unit, wanted_config
from wfcommon import as_list, job

with job(snakemake) as sm:
    from interbrain.train import train_config

    p = sm.params
    work = Path(p.work)
    wanted = wanted_config(p, p.task, p.seed)
    clear_stale_work(work, wanted)
    train_config(wanted, device=p.device, out=work, progress=True, threads=sm.threads)
    publish_unit(work, p.updates, as_list(sm.output.checkpoints), sm.output.latest, sm.output.metrics,
                 sm.output.events)
