"""rule train_request: the unit's training request, the `train` rule's input (see common.smk,
quarantine_corrupt_checkpoints, which rewrites it when a published checkpoint is corrupt)."""

import datetime
import json
import os

w = snakemake.wildcards  # noqa: F821 (injected by Snakemake)
out = snakemake.output[0]  # noqa: F821
request = {"unit": f"{w.arch}/{w.task}/seed_{w.seed}", "reason": "first request",
           "requested_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
with open(f"{out}.tmp", "w") as fh:
    json.dump(request, fh)
    fh.write("\n")
os.replace(f"{out}.tmp", out)
with open(snakemake.log[0], "w") as fh:  # noqa: F821
    fh.write(f"wrote {out}\n")
