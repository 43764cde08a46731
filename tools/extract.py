"""Fill the feature cache for a folder, a manifest, or a head's labelled data.

    python -m tools.extract input=/data/images
    python -m tools.extract head=colour
"""

from __future__ import annotations

from tools.common import client, device, head_spec, num_workers, tool, workspace


@tool("extract")
def main(cfg) -> None:
    from heads.training.data import load_labelled_data
    from registry.jobs.extract import extract_job
    from registry.jobs.train import resolve_trunk
    from registry.reports.summary import extract_lines
    from trunk.images import resolve_inputs

    ws = workspace(cfg)
    if cfg.head is not None:  # the schema checked that exactly one of input and head is given
        data = load_labelled_data(head_spec(cfg), hashes=ws.content_hashes())
        paths = [s.path for s in data.train + data.val]
    else:
        paths = resolve_inputs(cfg.input)
    trunk, version = resolve_trunk(client(cfg, ws), cfg.trunk_version)
    result = extract_job(trunk, paths, workspace=ws, taps=list(cfg.taps), batch_size=cfg.batch_size,
                         num_workers=num_workers(cfg), device=device(cfg), progress=cfg.progress)
    print(f"trunk v{version} ({trunk.trunk_id}) -> {ws.cache}")
    print("\n".join(extract_lines(result.summary)))
    for path, reason in list(result.errors.items())[:10]:
        print(f"  {path}: {reason}")


if __name__ == "__main__":
    main()
