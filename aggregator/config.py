"""Aggregator configuration, loadable from ``aggregator.toml`` (see examples/aggregator.toml)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from aggregator.rules import RULES
from edge_sdk.protocol.topics import DEFAULT_PREFIX, check_prefix
from edge_sdk.transport import MqttConfig

ROLES = ("all", "edge", "cloud")
CLUSTERING_MODES = ("tasks", "single", "ifca")


@dataclass(frozen=True)
class AggregatorConfig:
    aggregator_id: str = "aggregator"
    role: str = "all"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_tls_ca: str | None = None
    mqtt_topic_prefix: str = DEFAULT_PREFIX  # the fleet's topics, on its broker and the cloud's: {prefix}/v1/...
    state_dir: Path = Path("fedaigc-state")
    state_url: str | None = None           # default: sqlite under state_dir; or postgresql://...
    tokens: tuple[str, ...] = ("fedaigc-demo-token",)
    shared_group: str | None = None        # MQTT v5 shared subscription group for scale-out workers
    worker_id: str | None = None           # one per worker of a shared group (its MQTT session); a replacement reuses it
    expected_devices: int | None = None    # cluster as soon as this many task vectors arrived
    enrol_window_s: float = 60.0           # ... or this long after the first task vector
    rounds: int = 10
    round_timeout_s: float = 300.0
    max_extensions: int = 2                # deadline extensions before closing below quorum
    quorum: float = 0.6                    # fraction of a cluster's devices needed to close at the deadline
    local_steps: int = 20
    lora_rank: int = 2
    rule: str = "exact"
    clip: float | None = 3.0               # clip updates at this multiple of the median update norm
    clustering: str = "tasks"              # "tasks" (ours), "single" (one shared adapter: FedAvg), "ifca"
    k: int | None = None                   # fixed number of clusters (None: found from the data; ifca: required)
    refine_after_round: int = 1            # CFL-style refinement with update similarity (0: never)
    interaction: bool = True
    borrow: float = 1.0                    # inter-cluster shrinkage strength (device-equivalents)
    temperature: float = 0.1
    # what a lender needs (None: that signal does not gate); measured in benchmarks/interaction.py,
    # one task in two clusters vs different tasks: ΔW cosine 0.55-0.89 vs <= 0.29, but centered
    # task-centroid cosine -0.08-0.61 vs up to 0.43 (opposite styles): the ΔW decides by default
    interaction_min_agreement: float | None = 0.5   # cosine of the two clusters' ΔW
    interaction_min_similarity: float | None = None  # centered task-centroid cosine
    # per-module James-Stein pull toward the fleet's mean ΔW (aggregator/interaction.py); measured on
    # styled digits (benchmarks/interaction.py) it does not help the smallest cluster and costs the
    # others 0.04-0.06 style accuracy: off by default
    global_shrinkage: bool = False
    downlink_codec: str = "fp32"
    downlink_deltas: bool = True           # send adapters as deltas against what each device holds
    uplink_codecs: tuple[str, ...] = ("fp32", "fp16", "int8", "int4", "topk:0.1", "topk:0.1+int8",
                                      "topk:0.05+int8", "topk:0.1+int4", "topk:0.05+int4", "topk:0.2+int8")
    max_message_bytes: int = 64 * 1024 * 1024
    metrics_port: int | None = None        # serve Prometheus /metrics here (None: off)
    metrics_addr: str = "127.0.0.1"        # bind address for /metrics ("0.0.0.0" to expose it)
    # two tiers: an "edge" reports its clusters to the cloud aggregator at cloud_url each round
    cloud_url: str | None = None
    cloud_token: str = "fedaigc-demo-token"
    cloud_fingerprint: str | None = None   # pin the cloud's keys; None = trust on first use
    cloud_timeout_s: float = 60.0          # then the edge carries on with local interaction
    cloud_codec: str = "fp32"              # edge -> cloud cluster adapters
    expected_edges: int | None = None      # "cloud": mix as soon as this many edges reported a round
    serve_max_batch: int = 64              # generation service: images per batched sampling call
    serve_max_wait_s: float = 0.05         # ... and how long to wait for batch-mates
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "uplink_codecs", tuple(self.uplink_codecs))
        check_prefix(self.mqtt_topic_prefix)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.clustering not in CLUSTERING_MODES:
            raise ValueError(f"clustering must be one of {CLUSTERING_MODES}, got {self.clustering!r}")
        if self.clustering == "ifca" and not (self.k and self.k >= 2):
            raise ValueError("ifca clustering needs k >= 2 clusters")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {tuple(RULES)}, got {self.rule!r}")
        if not 0.0 < self.quorum <= 1.0:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.rounds < 1 or self.local_steps < 0 or self.lora_rank < 1:
            raise ValueError("rounds and lora_rank must be >= 1 and local_steps >= 0")
        if self.round_timeout_s <= 0 or self.enrol_window_s <= 0:
            raise ValueError("round_timeout_s and enrol_window_s must be > 0")
        if self.expected_devices is not None and self.expected_devices < 1:
            raise ValueError("expected_devices must be >= 1")
        if (self.role == "edge") != (self.cloud_url is not None):
            raise ValueError("role 'edge' needs cloud_url (the cloud aggregator's broker), and only it uses one")
        if self.expected_edges is not None and self.expected_edges < 1:
            raise ValueError("expected_edges must be >= 1")

    def mqtt(self, client_id: str, **options) -> MqttConfig:
        """The connection to this aggregator's own broker (the cloud link has its own URL)."""
        return MqttConfig(url=self.mqtt_url, client_id=client_id, username=self.mqtt_username,
                          password=self.mqtt_password, tls_ca=self.mqtt_tls_ca,
                          max_message_bytes=self.max_message_bytes, topic_prefix=self.mqtt_topic_prefix, **options)

    @property
    def store_url(self) -> str:
        return self.state_url or str(self.state_dir / "state.db")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "AggregatorConfig":
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        section = raw.get("aggregator", raw)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(unknown)}")
        return replace(cls(**section), **{k: v for k, v in overrides.items() if v is not None})
