"""rule train_ensemble: every unit (task x seed) of one architecture trained by interbrain.ensemble.train_ensemble
in one job, each in its own {unit}/train_work, then each unit's declared outputs published as rule `train`
publishes them (unit_work.py)."""

from pathlib import Path

from unit_work import clear_stale_work, publish_unit, wanted_config
from wfcommon import job

with job(snakemake) as sm:
    from interbrain.ensemble import train_ensemble

    p = sm.params
    configs = [wanted_config(p, task, seed) for task, seed in p.units]
    works = [Path(w) for w in p.works]
    for work, wanted in zip(works, configs):
        clear_stale_work(work, wanted)
    train_ensemble(configs, works, device=p.device, progress=True, threads=sm.threads)
    per_unit = len(sm.output.checkpoints) // len(works)
    for i, work in enumerate(works):
        publish_unit(work, p.updates, sm.output.checkpoints[i * per_unit:(i + 1) * per_unit], sm.output.latest[i],
                     sm.output.metrics[i], sm.output.events[i])
