"""rule manifest: interbrain.report.manifest.write_manifest (SPEC §5.4) for one architecture."""

from wfcommon import as_list, job


def flatten(files) -> list[str]:
    return [f for item in files for f in as_list(item)]


with job(snakemake) as sm:
    from interbrain.report.manifest import write_manifest

    outputs = flatten(sm.params.outputs.values())
    inputs = [f for f in flatten(sm.input) if f not in set(outputs)]
    write_manifest(inputs=inputs, outputs=outputs, config=dict(sm.params.config), out_json=sm.output[0])
