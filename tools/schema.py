"""The typed schema of every tool's config, registered in Hydra's ConfigStore.

Each root config (``conf/<tool>.yaml``) lists ``<tool>_schema`` first in its defaults, so
Hydra merges the YAML and the command line into these dataclasses: ``promote=no``,
``batch_size=ten`` or an unknown key fail at composition. Checks a type cannot express
(``num_workers`` is ``auto`` or a count, ``backend`` one of two names) live in
``__post_init__``, which runs when :func:`tools.common.tool` turns the composed config into
these objects (``OmegaConf.to_object``) before the tool starts. ``head`` is the head schema
itself (:class:`heads.spec.HeadConfig`), filled from the ``head`` config group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from heads.spec import HeadConfig


def one_of(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"field '{name}': '{value}' is not one of: {', '.join(options)}")


def check_timeout(value: float) -> None:
    """``distributed_timeout_s``: how long a torchrun rank waits for its peers, positive."""
    if not value > 0:
        raise ValueError(f"field 'distributed_timeout_s': must be positive, got {value}")


def check_workers(name: str, value: Any) -> None:
    """``auto`` or a count of processes (0: decode in the main process)."""
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field '{name}': '{value}' is not a number or 'auto'")
    if value < 0:
        raise ValueError(f"field '{name}': must be 0 or more, got {value}")


@dataclass
class TrackingConfig:
    uri: Optional[str] = None


@dataclass
class TrunkConfig:
    # tools.common.build_trunk instantiates only trunk.model.Trunk.
    _target_: str = "trunk.model.Trunk"
    model_name: str = MISSING
    pretrained: bool = False
    weights: Optional[str] = None
    seed: int = 0
    data_config: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    ops: list[Any] = field(default_factory=list)


@dataclass
class BaseConfig:
    workspace: str = "workspace"
    device: str = "auto"
    # Any: `auto` or an int (OmegaConf has no Union); checked in __post_init__.
    num_workers: Any = 0
    batch_size: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        check_workers("num_workers", self.num_workers)


@dataclass
class TrackedConfig(BaseConfig):
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class TrainSettings:
    """The optimiser settings every training run takes (multitask and distill override defaults)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.0001
    seed: int = 0


@dataclass
class TrainHeadConfig(TrackedConfig):
    # The `head` group fills it; a default node, so that -m head=a,b head.train.lr=x composes.
    head: HeadConfig = field(default_factory=HeadConfig)
    trunk_version: str = "production"
    promote: bool = True


@dataclass
class ExtractConfig(TrackedConfig):
    input: Optional[str] = None
    head: Optional[HeadConfig] = None
    taps: list[str] = field(default_factory=lambda: ["pooled"])
    trunk_version: str = "production"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.input is None) == (self.head is None):
            raise ValueError("field 'input': give exactly one of input=<folder or manifest> or head=<name>")


@dataclass
class TradeoffConfig(TrackedConfig):
    # The `head` group fills it; a default node, so that -m head=a,b head.train.lr=x composes.
    head: HeadConfig = field(default_factory=HeadConfig)
    taps: list[str] = field(default_factory=lambda: ["pooled"])
    tolerance: float = 0.01
    trunk_version: str = "production"
    pooled_train: dict[str, Any] = field(default_factory=dict)
    branch_train: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainTrunkConfig(TrackedConfig):
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tasks: list[str] = MISSING
    train: TrainSettings = field(default_factory=TrainSettings)
    adopt: bool = True
    retrain: bool = False
    # Under torchrun: how long a rank waits in a collective for its peers before the job fails.
    distributed_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_timeout(self.distributed_timeout_s)


@dataclass
class RegisterTrunkConfig(TrackedConfig):
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    adopt: bool = True


@dataclass
class RayConfig:
    """``backend=ray``: the cluster and its actors (:mod:`heads.classify.ray_backend`)."""

    address: Optional[str] = None
    actors: int = 1
    gpus_per_actor: Optional[float] = None
    decode_cpus: float = 1
    actor_cpus: float = 1
    decode_memory_mb: int = 1024
    batches_per_block: int = 4
    actor_start_timeout_s: float = 600
    window_batches: int = 4096


@dataclass
class ClassifyConfig(TrackedConfig):
    input: str = MISSING
    output: str = MISSING
    rows_per_shard: int = 10000
    allow_foreign_files: bool = False
    # null, `production`, or a release version number.
    release: Optional[str] = None
    backend: str = "local"
    draft: bool = True
    ray: RayConfig = field(default_factory=RayConfig)
    # A labels file to score every head on (registry.jobs.classify); null: none.
    labels: Optional[str] = None
    # Stream monitoring stats and assess drift (registry.jobs.monitor); false: the bare job.
    monitor: bool = True
    # The head bank's weight precision: null (the heads' float32), bfloat16, float16 or int8 (per-row scales).
    head_weights: Optional[str] = None
    # Seconds a run's shard claims hold unrenewed (runs on other hosts take over after it).
    claim_lease_s: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("backend", self.backend, ("local", "ray"))
        if self.head_weights is not None:
            one_of("head_weights", self.head_weights, ("float32", "bfloat16", "float16", "int8"))
        if not self.claim_lease_s > 0:
            raise ValueError(f"field 'claim_lease_s': must be positive, got {self.claim_lease_s}")


@dataclass
class ReportConfig(TrackedConfig):
    # At most this many heads per attention section; past it the full tables stay in the files.
    attention_rows: int = 20
    full: bool = False


@dataclass
class RollbackConfig(TrackedConfig):
    to: Optional[int] = None


@dataclass
class DemoData:
    """The demo's synthetic data set: :func:`demo.shapes.generate_shapes`'s arguments."""

    n_images: int = 3000
    n_holdout: int = 300
    size: int = 64
    seed: int = 0


@dataclass
class DemoConfig(TrackedConfig):
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DemoData = field(default_factory=DemoData)
    trunk_tasks: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    train: TrainSettings = field(default_factory=TrainSettings)


@dataclass
class ContractConfig:
    """The refresh contract's tolerances (:mod:`heads.checks.contract`)."""

    tolerance: float = 0.01
    slice_tolerance: float = 0.03
    min_slice_size: int = 20


@dataclass
class MultitaskSettings(TrainSettings):
    lr: float = 0.001
    # production (continue from the production trunk) or config (the `trunk` group).
    base: str = "production"

    def __post_init__(self) -> None:
        one_of("multitask.base", self.base, ("production", "config"))


@dataclass
class StudentSettings:
    """The student trunk distillation starts from (random init from ``seed``)."""

    model_name: str = "test_resnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class DistillSettings(TrainSettings):
    epochs: int = 30
    student: StudentSettings = field(default_factory=StudentSettings)
    input: Optional[str] = None
    # `auto` or a list of taps (Any: OmegaConf has no Union).
    taps: Any = "auto"
    # null: production's trunk; N: trunk version N (then linear probes stand in for the heads).
    teacher: Optional[int] = None
    # Weight of the heads' T^2 * KL(teacher || student) (0: features only).
    head_loss_weight: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.taps != "auto" and not (isinstance(self.taps, list) and all(isinstance(t, str) for t in self.taps)):
            raise ValueError(f"field 'distill.taps': '{self.taps}' is neither 'auto' nor a list of taps")
        if self.teacher is not None and self.teacher < 1:
            raise ValueError(f"field 'distill.teacher': '{self.teacher}' is neither null nor a trunk version (>= 1)")
        if not self.head_loss_weight >= 0:
            raise ValueError(f"field 'distill.head_loss_weight': '{self.head_loss_weight}' must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"field 'distill.temperature': '{self.temperature}' must be > 0")


@dataclass
class ParallelConfig:
    """How the refresh cascade spreads its heads (:class:`registry.jobs.cascade.Parallel` checks the values)."""

    backend: str = "serial"
    # `auto` or a count (Any: OmegaConf has no Union).
    workers: Any = "auto"
    threads: Any = "auto"
    address: Optional[str] = None

    def __post_init__(self) -> None:
        from registry.jobs.cascade import Parallel

        Parallel(self.backend, self.workers, self.threads, self.address)


@dataclass
class RefreshConfig(TrackedConfig):
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The `candidate` config group: how the candidate trunk is made (tools/candidates.py).
    candidate: Any = MISSING
    cascade: bool = True
    promote: bool = True
    contract: ContractConfig = field(default_factory=ContractConfig)
    multitask: MultitaskSettings = field(default_factory=MultitaskSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Under torchrun (candidate=distill|multitask): how long a rank waits for its peers.
    distributed_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_timeout(self.distributed_timeout_s)


@dataclass
class PipelineBench:
    """``suite=pipeline``: :func:`benchmarks.pipeline.run_pipeline_benchmark`'s own settings."""

    n_images: int = 256
    photo_size: list[int] = field(default_factory=lambda: [640, 480])
    batch_size: int = 32
    num_workers: Any = "auto"
    n_heads: int = 8
    repeats: int = 5
    images_dir: Optional[str] = None

    def __post_init__(self) -> None:
        check_workers("pipeline.num_workers", self.num_workers)


@dataclass
class StreamingBench:
    """``suite=streaming``: :func:`benchmarks.streaming.run_streaming_benchmark`'s own settings."""

    images: list[int] = field(default_factory=lambda: [10000, 30000])
    lines: list[int] = field(default_factory=lambda: [1000000, 10000000])
    batch_size: int = 64
    num_workers: int = 1
    workdir: Optional[str] = None


@dataclass
class BankBench:
    """``suite=bank``: :func:`benchmarks.bank.run_bank_benchmark`'s own settings."""

    n_heads: int = 256
    num_classes: int = 1000
    batch_sizes: list[int] = field(default_factory=lambda: [8, 64])
    weight_dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16", "float16", "int8"])
    n_mlp: int = 64
    mlp_hidden: int = 256
    repeats: int = 5


@dataclass
class CacheBench:
    """``suite=cache``: :func:`benchmarks.cache.run_cache_benchmark`'s own settings."""

    rows: list[int] = field(default_factory=lambda: [100000, 1000000])
    dim: int = 2048
    epochs: int = 1
    batch_size: int = 1024
    dtype: str = "float16"
    hash_files: int = 20000
    workdir: Optional[str] = None


@dataclass
class RoundtripBench:
    """``suite=roundtrips``: head counts of :func:`benchmarks.roundtrips.run_roundtrip_benchmark`."""

    head_counts: list[int] = field(default_factory=lambda: [10, 300])
    workdir: Optional[str] = None


@dataclass
class PromotionBench:
    """``suite=promotion``: :func:`benchmarks.promotion.run_promotion_benchmark`'s own settings."""

    processes: int = 16
    heads_per_process: int = 4
    preload: list[int] = field(default_factory=lambda: [0, 100, 300])
    workdir: Optional[str] = None


@dataclass
class CascadeBench:
    """``suite=cascade``: :func:`benchmarks.cascade.run_cascade_benchmark`'s own settings."""

    n_heads: int = 100
    workers: list[int] = field(default_factory=lambda: [1, 2])
    backend: str = "process"
    n_images: int = 600
    image_size: int = 64
    head_epochs: int = 5
    mlp_every: int = 10
    branch_every: int = 100
    root: Optional[str] = None


@dataclass
class QuantizeBench:
    """``suite=quantize``: :func:`benchmarks.quantize.run_quantize_benchmark`'s own settings."""

    batch_size: int = 8
    n_batches: int = 2
    repeats: int = 5
    schemes: Optional[list[str]] = None
    calibration: int = 16


@dataclass
class CachePrecisionBench:
    """``suite=cache_precision``: :func:`benchmarks.cache_precision.run_cache_precision_benchmark`'s settings."""

    n_images: int = 3000
    size: int = 64
    heads: list[str] = field(default_factory=lambda: ["shape", "colour", "count", "texture"])
    model: str = "test_resnet"
    workdir: Optional[str] = None


@dataclass
class BenchConfig(BaseConfig):
    suite: str = "heads"
    model: str = "resnet18"
    image_size: int = 224
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4
    n_batches: int = 2
    warmup: int = 1
    repeats: int = 15
    separate_repeats: int = 5
    train_repeats: int = 5
    head_counts: list[int] = field(default_factory=lambda: [1, 8, 32])
    linear_only: list[int] = field(default_factory=lambda: [32])
    mlp_every: int = 4
    num_classes: int = 10
    n_models: int = 8
    train_epochs: int = 3
    seed: int = 0
    threads: Optional[int] = None
    output: Optional[str] = None
    pipeline: PipelineBench = field(default_factory=PipelineBench)
    streaming: StreamingBench = field(default_factory=StreamingBench)
    bank: BankBench = field(default_factory=BankBench)
    cache: CacheBench = field(default_factory=CacheBench)
    roundtrips: RoundtripBench = field(default_factory=RoundtripBench)
    promotion: PromotionBench = field(default_factory=PromotionBench)
    cascade: CascadeBench = field(default_factory=CascadeBench)
    quantize: QuantizeBench = field(default_factory=QuantizeBench)
    cache_precision: CachePrecisionBench = field(default_factory=CachePrecisionBench)

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("suite", self.suite, ("heads", "pipeline", "streaming", "bank", "cache", "roundtrips", "promotion",
                                       "cascade", "quantize", "cache_precision"))


@dataclass
class MonitorConfig(TrackedConfig):
    # One of: head=<name> (the `head` group: conf/heads/<name>.yaml, as tools.train_head), or a
    # release (`production` or a version number). Any: the head group's node, or None.
    head: Any = None
    release: Optional[str] = None
    # Retraining is recommended when a head's verdict was `drift` in each of its last `last` jobs.
    last: int = 3
    # Start train_head for every head recommended (on its configured, fresh labelled data).
    retrain: bool = False
    # Where the table's PNGs go; null: <workspace>/monitor.
    output: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.head is None) == (self.release is None):
            raise ValueError("field 'head' / 'release': give exactly one (head=<name> or release=production|N)")
        if self.last < 1:
            raise ValueError(f"field 'last': must be at least 1, got {self.last}")


@dataclass
class QuantizeSettings:
    """How a quantized candidate is calibrated (tools.candidates.Quantize; the scheme is per candidate)."""

    calibration_images: int = 256
    # Calibration images (folder, manifest, URI); null: the production heads' training images.
    input: Optional[str] = None
    seed: int = 0


@dataclass
class ReduceSpace:
    """The reductions ``tools.reduce`` searches (registry.jobs.reduce)."""

    # Quantization schemes applied to production's trunk.
    schemes: list[str] = field(default_factory=lambda: ["static", "dynamic"])
    # Distilled students by name ([a-z0-9_]+): each a timm model and its kwargs.
    students: dict[str, StudentSettings] = field(default_factory=dict)
    # Schemes applied to each distilled student as well (the combinations).
    student_schemes: list[str] = field(default_factory=lambda: ["static"])

    def __post_init__(self) -> None:
        import re

        for name in self.students:
            if not re.fullmatch(r"[a-z0-9_]+", str(name)):
                raise ValueError(f"field 'space.students': name '{name}' must match [a-z0-9_]+")


@dataclass
class ReduceConfig(TrackedConfig):
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    promote: bool = True
    # What "cheapest" means: ms (time per image measured here), gflops or bytes (serving weights).
    cost: str = "ms"
    space: ReduceSpace = field(default_factory=ReduceSpace)
    distill: DistillSettings = field(default_factory=DistillSettings)
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    contract: ContractConfig = field(default_factory=ContractConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("cost", self.cost, ("ms", "gflops", "bytes"))


SCHEMAS = {
    "train_head": TrainHeadConfig, "extract": ExtractConfig, "tradeoff": TradeoffConfig,
    "train_trunk": TrainTrunkConfig, "register_trunk": RegisterTrunkConfig, "classify": ClassifyConfig,
    "report": ReportConfig, "rollback": RollbackConfig, "demo": DemoConfig, "refresh": RefreshConfig,
    "bench": BenchConfig, "monitor": MonitorConfig, "reduce": ReduceConfig,
}


def register() -> None:
    """Store ``<tool>_schema`` for every tool (idempotent: ConfigStore replaces same-named nodes)."""
    cs = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)
