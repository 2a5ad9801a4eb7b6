"""The MQTT topic layout, in one place (README "Topic layout" mirrors this file).

Every topic of a fleet lies under ``{prefix}/v1``, the prefix being ``fedaigc`` unless the
fleet's ``MqttConfig.topic_prefix`` says otherwise: fleets that share a broker (staging and
production, two tenants) pick different prefixes, and then neither sees the other's
retained keys, enrolments or updates. ``v1`` is the protocol version, not configurable.

    fedaigc/v1/aggregator/keys                 retained  aggregator's public keys (signed)
    fedaigc/v1/enrol/{device}                  device -> aggregator  enrolment (sealed)
    fedaigc/v1/up/task/{device}                device -> aggregator  task vector (sealed)
    fedaigc/v1/up/update/{device}              device -> aggregator  adapter delta (box)
    fedaigc/v1/up/generate/{device}            device -> aggregator  generation request (sealed)
    fedaigc/v1/up/status/{device}              device -> aggregator  signed status (e.g. "need a full adapter")
    fedaigc/v1/down/{device}                   aggregator -> device  everything addressed to one device (box)
    fedaigc/v1/status/{device}                 retained  "online" / "offline" (last will)
    fedaigc/v1/rollout/manifest/{target}       retained  signed rollout manifest per target ("all", "cluster-{id}")
    fedaigc/v1/rollout/artifact/{sha256}/{i}   retained  part i of an export file, by content hash (signed)
    fedaigc/v1/rollout/report/{device}         device -> aggregator  installed version
    fedaigc/v1/cloud/keys                      retained  cloud aggregator's public keys (signed)
    fedaigc/v1/cloud/enrol/{edge}              edge -> cloud  edge aggregator enrolment (sealed)
    fedaigc/v1/cloud/up/{edge}                 edge -> cloud  cluster adapters + centroids of a round (box)
    fedaigc/v1/cloud/down/{edge}               cloud -> edge  the edge's clusters after cross-edge interaction (box)

Aggregator workers share the uplink with ``$share/{group}/{prefix}/v1/up/#`` (MQTT v5).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.protocol.errors import Refusal, RefusedMessage

PROTOCOL = "v1"
DEFAULT_PREFIX = "fedaigc"


def check_prefix(prefix: str) -> str:
    """A prefix must be plain topic levels: a wildcard or an empty level would widen every
    subscription built on it, and ``$`` topics are the broker's own."""
    levels = prefix.split("/")
    if not prefix or prefix.startswith("$") or any(not lv for lv in levels) \
            or any(ch in prefix for ch in "+#\x00"):
        raise ValueError(f"topic prefix must be non-empty levels without wildcards, '$' or '//', got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class Topics:
    """The topics of one fleet."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    @property
    def root(self) -> str:
        return f"{self.prefix}/{PROTOCOL}"

    @property
    def aggregator_keys(self) -> str:
        return f"{self.root}/aggregator/keys"

    @property
    def rollout_manifests(self) -> str:
        return f"{self.root}/rollout/manifest/+"

    @property
    def task_all(self) -> str:
        return f"{self.root}/up/task/+"

    @property
    def update_all(self) -> str:
        return f"{self.root}/up/update/+"

    @property
    def generate_all(self) -> str:
        return f"{self.root}/up/generate/+"

    @property
    def device_status_all(self) -> str:
        return f"{self.root}/up/status/+"

    @property
    def enrol_all(self) -> str:
        return f"{self.root}/enrol/+"

    @property
    def status_all(self) -> str:
        return f"{self.root}/status/+"

    @property
    def rollout_report_all(self) -> str:
        return f"{self.root}/rollout/report/+"

    @property
    def cloud_keys(self) -> str:
        return f"{self.root}/cloud/keys"

    @property
    def cloud_enrol_all(self) -> str:
        return f"{self.root}/cloud/enrol/+"

    @property
    def cloud_up_all(self) -> str:
        return f"{self.root}/cloud/up/+"

    def cloud_enrol(self, edge: str) -> str:
        return f"{self.root}/cloud/enrol/{edge}"

    def cloud_up(self, edge: str) -> str:
        return f"{self.root}/cloud/up/{edge}"

    def cloud_down(self, edge: str) -> str:
        return f"{self.root}/cloud/down/{edge}"

    def enrol(self, device: str) -> str:
        return f"{self.root}/enrol/{device}"

    def task(self, device: str) -> str:
        return f"{self.root}/up/task/{device}"

    def update(self, device: str) -> str:
        return f"{self.root}/up/update/{device}"

    def generate(self, device: str) -> str:
        return f"{self.root}/up/generate/{device}"

    def device_status(self, device: str) -> str:
        return f"{self.root}/up/status/{device}"

    def down(self, device: str) -> str:
        return f"{self.root}/down/{device}"

    def status(self, device: str) -> str:
        return f"{self.root}/status/{device}"

    def rollout_manifest(self, target: str) -> str:
        """One retained manifest per target, so a rollout to one cluster does not hide another target's
        version from a device that was offline."""
        return f"{self.root}/rollout/manifest/{target}"

    def rollout_artifact_part(self, sha256: str, index: int) -> str:
        """One retained part of an export file: parts are retained one per topic, because a broker keeps
        one retained message per topic and a file is larger than one frame."""
        return f"{self.root}/rollout/artifact/{sha256}/{index}"

    def rollout_artifact_parts(self, sha256: str) -> str:
        return f"{self.root}/rollout/artifact/{sha256}/+"

    def rollout_report(self, device: str) -> str:
        return f"{self.root}/rollout/report/{device}"


def shared(group: str, topic_filter: str) -> str:
    return f"$share/{group}/{topic_filter}"


def device_of(topic: str) -> str:
    """The device id a per-device topic ends with."""
    return topic.rsplit("/", 1)[-1]


def check_sender(topic: str, sender: str) -> None:
    """A signed envelope on a per-device topic must come from that device: no one speaks on another's topic."""
    if device_of(topic) != sender:
        raise RefusedMessage(Refusal.MALFORMED, f"sender {sender} published on {topic}")
