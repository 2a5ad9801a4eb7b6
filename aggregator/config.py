"""Aggregator configuration, loadable from ``aggregator.toml`` (see examples/aggregator.toml).

Checked in two steps so an operator's mistake is one line within a second (``aggregator.settings``):
every setting's type and range, read off its declaration, before anything heavy is imported; then
what needs the model libraries (rule and policy names, the base model's family, the LoRA table).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator.sample_bound import SampleBound
from aggregator.settings import ConfigError, check_settings, read_table
from edge_sdk.protocol.topics import DEFAULT_PREFIX, check_prefix
from edge_sdk.transport import MqttConfig
from models.digits.paths import BASE_MODEL_DIR

if TYPE_CHECKING:  # peft loads with torch: the checker sees ``LoraTable`` in its place
    from peft import LoraConfig

ROLES = ("all", "edge", "cloud")


def _setting(default=None, doc: str = "", within: str | None = None):
    """A setting with the sentence ``docs/aggregator.md`` shows for it (generated: ``tests/test_docs.py``)
    and, for a number, the range it must lie ``within`` (``"(0, 1]"``, ``">= 1"``: ``aggregator.settings``)."""
    return field(default=default, metadata={"doc": doc} | ({"within": within} if within else {}))


class LoraTable:
    """How the type checker reads ``lora``'s ``LoraConfig`` before peft is imported: a TOML table of
    its fields, or a ``LoraConfig`` a program built (peft is loaded then, so nothing loads here)."""

    description = "a table of r, lora_alpha, target_modules"

    @staticmethod
    def accepts(value) -> bool:
        peft = sys.modules.get("peft")
        return isinstance(value, Mapping) or (peft is not None and isinstance(value, peft.LoraConfig))


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything an aggregator daemon is told; ``[aggregator]`` of ``aggregator.toml`` holds the same names."""

    # identity and broker
    aggregator_id: str = _setting("aggregator", "The id devices know this aggregator by (its envelopes' sender).")
    role: str = _setting("all", "`all`: one tier; `edge`: serve devices and report clusters to the cloud; "
                                "`cloud`: mix the clusters of every edge.")
    mqtt_url: str = _setting("mqtt://127.0.0.1:1883", "This aggregator's broker; `mqtts://host:8883` for TLS.")
    mqtt_username: str | None = _setting(None, "Broker user name (also accepted inside `mqtt_url`).")
    mqtt_password: str | None = _setting(None, "Broker password.")
    mqtt_tls_ca: str | None = _setting(None, "CA bundle for the broker's certificate (default: the system's).")
    mqtt_topic_prefix: str = _setting(DEFAULT_PREFIX, "The fleet's topics lie under `{prefix}/v1/`; fleets "
                                                      "sharing a broker pick different prefixes.")
    announce_interval_s: float | None = _setting(60.0, "Publish the retained key announcement again this often "
                                                       "(none: only at start and when it is altered or cleared).")
    # state
    state_dir: Path = _setting(Path("fedaigc-state"), "Holds the aggregator's key and the default SQLite store.")
    state_url: str | None = _setting(None, "The state store: default SQLite under `state_dir`, or "
                                           "`postgresql://...` for scale-out workers.")
    tokens: tuple[str, ...] = _setting((), "Fleet-wide enrolment tokens for simulations and tests (devices are "
                                           "provisioned one by one: `fedaigc provision`); a token removed from this "
                                           "list is revoked at start, with the devices it enrolled.")
    shared_group: str | None = _setting(None, "MQTT v5 shared-subscription group: several workers share the uplink.")
    worker_id: str | None = _setting(None, "One per worker of a shared group (its MQTT session); a replacement "
                                           "reuses it.")
    # enrolment and rounds
    expected_devices: int | None = _setting(None, "Group the fleet as soon as this many task vectors arrived ...",
                                            ">= 1")
    enrol_window_s: float = _setting(60.0, "... or this long after the first one.", "> 0")
    rounds: int = _setting(10, "Federated rounds; the last one's adapters are installed on every device.", ">= 1")
    round_timeout_s: float = _setting(300.0, "A cluster's deadline per round.", "> 0")
    max_extensions: int = _setting(2, "Deadline extensions for stragglers before a cluster closes below quorum.",
                                 ">= 0")
    quorum: float = _setting(0.6, "Share of a cluster's devices whose updates close it at the deadline.",
                            "(0, 1]")
    local_steps: int = _setting(20, "Optimizer steps each device trains per round.", ">= 0")
    base_model: Path = _setting(BASE_MODEL_DIR, "The fleet's base model: the bundled digits UNet, or a local "
                                                "Stable-Diffusion-family pipeline directory (`save_pretrained`). "
                                                "A device running another is refused at enrolment.")
    lora: LoraConfig | None = _setting(None, "The fleet's adapter, peft's `LoraConfig`: `[aggregator.lora]` with `r`, "
                                             "`lora_alpha`, `target_modules` (default: rank 2 on the base model's "
                                             "default targets). Every round start carries it.")
    # learning
    rule: str = _setting("exact", "Aggregation inside a cluster: `fedavg`, `exact`, `median` or `trimmed_mean` "
                                  "(docs/algorithms.md).")
    rank_split: str = _setting("svd", "How a device of a rank below the fleet's (`lora.r`) gets its cluster's "
                                      "adapter: `svd` (the best approximation at its rank, FlexLoRA) or `zero_pad` "
                                      "(the factors' largest rank slots, HetLoRA) (docs/algorithms.md).")
    clip: float | None = _setting(3.0, "Clip updates at this multiple of the round's median update norm "
                                       "(and screen those far beyond it); none: off.")
    max_samples: int = _setting(SampleBound.max_samples, "A device's update weighs at most this many samples, "
                                "whatever it claims (stored capped; at most 2**31 - 1).")
    samples_multiple: float | None = _setting(SampleBound.median_multiple, "... and at most this multiple of the "
                                              "lower median claim of its cluster's round (none: no cluster-relative "
                                              "cap).")
    clustering: str = _setting("tasks", "`tasks` (task vectors, then update similarity), `single` (one adapter "
                                        "for all: FedAvg), `ifca` (devices choose among k).")
    k: int | None = _setting(None, "A fixed number of clusters (none: found from the data; `ifca` needs it).",
                                 ">= 1")
    refine_after_round: int = _setting(1, "Regroup once on task and update similarity after this round (0: never).",
                                     ">= 0")
    interaction: bool = _setting(False, "Let clusters borrow from each other between rounds (off by default: its "
                                 "measured gain is within noise of zero).")
    borrow: float = _setting(1.0, "How much a cluster borrows, in device-equivalents.", ">= 0")
    temperature: float = _setting(0.1, "Softmax temperature over lenders' similarity.", "> 0")
    interaction_min_agreement: float | None = _setting(0.5, "A lender's ΔW cosine with the borrower's must reach "
                                                            "this (none: no gate).", "[-1, 1]")
    interaction_min_similarity: float | None = _setting(None, "A lender's centred task-centroid cosine must reach "
                                                              "this (none: no gate).", "[-1, 1]")
    global_shrinkage: bool = _setting(False, "Per-module James-Stein pull toward the fleet's mean ΔW "
                                             "(docs/results.md says why it is off).")
    # wire
    downlink_codec: str = _setting("fp32", "Codec of adapters sent to devices.")
    downlink_deltas: bool = _setting(True, "Send adapters as deltas against what each device holds.")
    uplink_codecs: tuple[str, ...] = _setting(("fp32", "fp16", "int8", "int4", "topk:0.1", "topk:0.1+int8",
                                               "topk:0.05+int8", "topk:0.1+int4", "topk:0.05+int4", "topk:0.2+int8"),
                                              "Update codecs accepted from devices.")
    max_message_bytes: int = _setting(64 * 1024 * 1024, "Largest message accepted, chunked or not.", ">= 1")
    max_reassembly_bytes: int = _setting(256 * 1024 * 1024, "Partial chunked messages, all senders together; one "
                                                            "sender holds at most half (docs/protocol.md#chunking).",
                                         ">= 1")
    reassembly_timeout_s: float = _setting(120.0, "A partial chunked message with no new chunk this long is dropped.",
                                           "> 0")
    # operations
    metrics_port: int | None = _setting(None, "Serve Prometheus `/metrics` on this port (none: off).",
                                       "[1, 65535]")
    metrics_addr: str = _setting("127.0.0.1", "Bind address of `/metrics` (`0.0.0.0` exposes it).")
    # two tiers
    cloud_url: str | None = _setting(None, "`edge`: the cloud aggregator's broker.")
    cloud_token: str = _setting("", "`edge`: the token this edge enrols at the cloud with (from the cloud's "
                                    "`fedaigc provision EDGE_ID` bundle).")
    cloud_fingerprint: str | None = _setting(None, "`edge`: pin the cloud's keys (the bundle's fingerprint, or the "
                                                   "one the cloud prints when it starts).")
    cloud_trust_on_first_use: bool = _setting(False, "`edge`: without `cloud_fingerprint`, trust the first cloud "
                                                     "key seen (an explicit opt-in; refused otherwise).")
    cloud_timeout_s: float = _setting(60.0, "`edge`: then interact locally if the cloud has not answered.",
                                "> 0")
    cloud_codec: str = _setting("fp32", "`edge`: codec of the cluster adapters sent to the cloud.")
    expected_edges: int | None = _setting(None, "`cloud`: mix a round as soon as this many edges reported it.",
                                          ">= 1")
    # generation service
    serve_max_batch: int = _setting(64, "Images per batched sampling call of the generation service.",
                                 ">= 1")
    serve_max_wait_s: float = _setting(0.05, "How long a request waits for batch-mates.", ">= 0")
    serve_max_queue: int = _setting(256, "Images waiting for sampling at most; a request beyond is answered `busy`.",
                                    ">= 1")
    serve_device_rate: float | None = _setting(60.0, "Images per minute one device may have sampled (none: no "
                                                     "per-device limit); beyond, its requests are answered `busy` ...",
                                               "> 0")
    serve_device_burst: int = _setting(16, "... of which this many at once, after a quiet spell.", ">= 1")
    seed: int = _setting(0, "Seeds the fleet's round-1 adapter (devices draw the same one from it).")

    def __post_init__(self) -> None:
        """Refuses a wrong setting with a ``ConfigError``: what the declarations say first, torch-free."""
        values = check_settings(type(self), {f.name: getattr(self, f.name) for f in fields(self)},
                                {"LoraConfig": LoraTable})
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if (self.role == "edge") != (self.cloud_url is not None):
            raise ConfigError("role 'edge' needs cloud_url (the cloud aggregator's broker), and only it uses one")
        try:
            check_prefix(self.mqtt_topic_prefix)
            self.mqtt("check")  # the broker URL's scheme and host
            SampleBound(self.max_samples, self.samples_multiple)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._check_with_models()

    def _check_with_models(self) -> None:
        """What only the model libraries know: rule and policy names, the base model's family, the LoRA table."""
        from aggregator.policies import make_policy
        from aggregator.rank_split import SPLITS
        from aggregator.rules import RULES
        from models.backend import family_of
        from models.lora import DEFAULT_TARGETS, LoraConfig, lora_config, lora_from_dict

        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.rank_split not in SPLITS:
            raise ConfigError(f"rank_split must be one of {', '.join(SPLITS)}, got {self.rank_split!r}")
        try:
            make_policy(self.clustering, self.k, self.refine_after_round)  # refuses unknown names, IFCA without k
            targets = DEFAULT_TARGETS[family_of(self.base_model)]  # reads the directory's files, loads nothing
            if self.lora is None:
                object.__setattr__(self, "lora", lora_config(target_modules=targets))
            elif not isinstance(self.lora, LoraConfig):  # a TOML table
                object.__setattr__(self, "lora", lora_from_dict(self.lora, targets))
        except FileNotFoundError as e:
            raise ConfigError(f"base_model: {e}") from None
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def sample_bound(self) -> SampleBound:
        return SampleBound(self.max_samples, self.samples_multiple)

    def mqtt(self, client_id: str, **options) -> MqttConfig:
        """The connection to this aggregator's own broker (the cloud link has its own URL)."""
        return MqttConfig(url=self.mqtt_url, client_id=client_id, username=self.mqtt_username,
                          password=self.mqtt_password, tls_ca=self.mqtt_tls_ca,
                          max_message_bytes=self.max_message_bytes, max_reassembly_bytes=self.max_reassembly_bytes,
                          reassembly_timeout_s=self.reassembly_timeout_s, topic_prefix=self.mqtt_topic_prefix,
                          **options)

    @property
    def store_url(self) -> str:
        return self.state_url or str(self.state_dir / "state.db")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "AggregatorConfig":
        """``[aggregator]`` of ``path``, then the command line's ``overrides`` (None: not given)."""
        section = read_table(path, "aggregator", (f.name for f in fields(cls)))
        # one construction, so settings derived from others (the LoRA targets from base_model) see the overrides
        return cls(**(section | {k: v for k, v in overrides.items() if v is not None}))
