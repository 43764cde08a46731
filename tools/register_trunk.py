"""Register a trunk as it is (random init, a local weights file or hub weights) as a `trunk` version.

    python -m tools.register_trunk trunk=resnet50
    python -m tools.register_trunk trunk=local_weights trunk.model_name=convnext_tiny trunk.weights=/w.safetensors
"""

from __future__ import annotations

from tools.common import build_trunk, client, tool, workspace


@tool("register_trunk")
def main(cfg) -> None:
    from registry.jobs.train_trunk import adopt_trunk
    from registry.store.trunks import register_trunk

    ws = workspace(cfg)
    mlflow_client = client(cfg, ws)
    trunk = build_trunk(cfg.trunk)
    version = register_trunk(mlflow_client, trunk, description=f"{trunk.model_name} as configured")
    status = adopt_trunk(mlflow_client, version)[0] if cfg.adopt else "registered"
    taps = ", ".join(f"{t.name} {list(t.shape)}" for t in trunk.taps.values())
    print(f"trunk v{version} ({trunk.model_name}, trunk_id {trunk.trunk_id}): {status}")
    print(f"  taps: {taps}")


if __name__ == "__main__":
    main()
