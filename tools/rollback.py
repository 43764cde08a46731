"""Move production back to the previous release (or to release ``to=N``), by compare-and-swap.

    python -m tools.rollback
    python -m tools.rollback to=2
"""

from __future__ import annotations

from tools.common import client, tool, workspace


def describe(release) -> str:
    """``v2 (trunk v1; heads colour v1, shape v2)`` for a :class:`registry.store.releases.Release`."""
    heads = ", ".join(f"{name} v{version}" for name, version in sorted(release.heads.items()))
    return f"v{release.version} (trunk v{release.trunk_version}; {'heads ' + heads if heads else 'no heads'})"


@tool("rollback")
def main(cfg) -> None:
    from registry.store.releases import rollback

    ws = workspace(cfg)
    source, target = rollback(client(cfg, ws), to=cfg.to)  # the schema made `to` an int or None
    print(f"production: release v{source.version} -> {describe(target)}")


if __name__ == "__main__":
    main()
