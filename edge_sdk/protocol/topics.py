"""The MQTT topic layout, in one place: ``LAYOUT`` below is the table ``docs/protocol.md`` shows.

Every topic of a fleet lies under ``{prefix}/v1``, the prefix being ``fedaigc`` unless the
fleet's ``MqttConfig.topic_prefix`` says otherwise: fleets that share a broker (staging and
production, two tenants) pick different prefixes, and then neither sees the other's
retained keys, enrolments or updates. ``v1`` is the protocol version, not configurable.
Scale-out aggregator workers subscribe to each uplink filter as ``$share/{group}/...`` (MQTT v5).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_sdk.protocol.errors import Refusal, RefusedMessage

PROTOCOL = "v1"
DEFAULT_PREFIX = "fedaigc"
MAX_DEVICE_ID = 128  # characters; the envelope's sender bound


@dataclass(frozen=True)
class TopicSpec:
    """One topic of the layout: its pattern under ``{prefix}/v1``, who publishes, who reads, what it carries."""

    pattern: str
    publisher: str
    reader: str
    retained: bool
    carries: str


LAYOUT: tuple[TopicSpec, ...] = (
    TopicSpec("aggregator/keys", "aggregator", "devices", True, "the aggregator's public keys, self-signed"),
    TopicSpec("enrol/{device}", "device", "aggregator", False, "enrolment: token and public keys (sealed)"),
    TopicSpec("up/task/{device}", "device", "aggregator", False, "the task vector (sealed)"),
    TopicSpec("up/update/{device}", "device", "aggregator", False, "the shared adapter's delta (box)"),
    TopicSpec("up/generate/{device}", "device", "aggregator", False, "a generation request: encoding and mix (sealed)"),
    TopicSpec("up/status/{device}", "device", "aggregator", False, "signed status, e.g. \"need a full adapter\" (box)"),
    TopicSpec("down/{device}", "aggregator", "device", False,
              "everything addressed to one device: acks, cluster, round starts, images (box)"),
    TopicSpec("status/{device}", "device (last will)", "aggregator", True, "\"online\" / \"offline\""),
    TopicSpec("rollout/manifest/{target}", "rollout", "devices", True,
              "the signed rollout manifest of a target (\"all\", \"cluster-{id}\")"),
    TopicSpec("rollout/artifact/{sha256}/{i}", "rollout", "devices", True,
              "part i of an export file, by content hash (signed)"),
    TopicSpec("rollout/report/{device}", "device", "aggregator", False, "the version a device runs (box)"),
    TopicSpec("cloud/keys", "cloud aggregator", "edge aggregators", True, "the cloud's public keys, self-signed"),
    TopicSpec("cloud/enrol/{edge}", "edge aggregator", "cloud aggregator", False, "edge enrolment (sealed)"),
    TopicSpec("cloud/up/{edge}", "edge aggregator", "cloud aggregator", False,
              "a round's cluster adapters, centroids and sizes (box)"),
    TopicSpec("cloud/down/{edge}", "cloud aggregator", "edge aggregator", False,
              "the edge's clusters after cross-edge interaction (box)"),
)


def check_prefix(prefix: str) -> str:
    """A prefix must be plain topic levels: a wildcard or an empty level would widen every
    subscription built on it, and ``$`` topics are the broker's own."""
    levels = prefix.split("/")
    if not prefix or prefix.startswith("$") or any(not lv for lv in levels) \
            or any(ch in prefix for ch in "+#\x00"):
        raise ValueError(f"topic prefix must be non-empty levels without wildcards, '$' or '//', got {prefix!r}")
    return prefix


def check_device_id(device_id: str) -> str:
    """A device id is one topic level: the broker's ``%u`` ACL patterns put it in a topic, so a ``/``
    or a wildcard in it would widen a device's rights to other devices' topics, and ``$`` marks the
    broker's own topics."""
    if not isinstance(device_id, str) or not 0 < len(device_id) <= MAX_DEVICE_ID \
            or any(ch in device_id for ch in "/+#$\x00"):
        raise ValueError(f"a device id must be 1-{MAX_DEVICE_ID} characters without '/', '+', '#', '$' "
                         f"or NUL, got {device_id!r}")
    return device_id


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
    """A signed envelope on a per-device topic must come from that device (no one speaks on another's
    topic), whose id is one plain topic level."""
    try:
        check_device_id(sender)
    except ValueError as e:
        raise RefusedMessage(Refusal.MALFORMED, str(e)) from None
    if device_of(topic) != sender:
        raise RefusedMessage(Refusal.MALFORMED, f"sender {sender} published on {topic}")
