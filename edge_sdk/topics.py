"""The MQTT topic layout, in one place (README "Topic layout" mirrors this file).

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

Aggregator workers share the uplink with ``$share/{group}/fedaigc/v1/up/#`` (MQTT v5).
"""

ROOT = "fedaigc/v1"
AGGREGATOR_KEYS = f"{ROOT}/aggregator/keys"
ROLLOUT_MANIFESTS = f"{ROOT}/rollout/manifest/+"
UPLINK_ALL = f"{ROOT}/up/#"
ENROL_ALL = f"{ROOT}/enrol/+"
STATUS_ALL = f"{ROOT}/status/+"
ROLLOUT_REPORT_ALL = f"{ROOT}/rollout/report/+"
CLOUD_KEYS = f"{ROOT}/cloud/keys"
CLOUD_ENROL_ALL = f"{ROOT}/cloud/enrol/+"
CLOUD_UP_ALL = f"{ROOT}/cloud/up/+"


def cloud_enrol(edge: str) -> str:
    return f"{ROOT}/cloud/enrol/{edge}"


def cloud_up(edge: str) -> str:
    return f"{ROOT}/cloud/up/{edge}"


def cloud_down(edge: str) -> str:
    return f"{ROOT}/cloud/down/{edge}"


def enrol(device: str) -> str:
    return f"{ROOT}/enrol/{device}"


def task(device: str) -> str:
    return f"{ROOT}/up/task/{device}"


def update(device: str) -> str:
    return f"{ROOT}/up/update/{device}"


def generate(device: str) -> str:
    return f"{ROOT}/up/generate/{device}"


def device_status(device: str) -> str:
    return f"{ROOT}/up/status/{device}"


def down(device: str) -> str:
    return f"{ROOT}/down/{device}"


def status(device: str) -> str:
    return f"{ROOT}/status/{device}"


def rollout_manifest(target: str) -> str:
    """One retained manifest per target, so a rollout to one cluster does not hide another target's
    version from a device that was offline."""
    return f"{ROOT}/rollout/manifest/{target}"


def rollout_artifact_part(sha256: str, index: int) -> str:
    """One retained part of an export file: parts are retained one per topic, because a broker keeps
    one retained message per topic and a file is larger than one frame."""
    return f"{ROOT}/rollout/artifact/{sha256}/{index}"


def rollout_artifact_parts(sha256: str) -> str:
    return f"{ROOT}/rollout/artifact/{sha256}/+"


def rollout_report(device: str) -> str:
    return f"{ROOT}/rollout/report/{device}"


def shared(group: str, topic_filter: str) -> str:
    return f"$share/{group}/{topic_filter}"


def device_of(topic: str) -> str:
    """The device id a per-device topic ends with."""
    return topic.rsplit("/", 1)[-1]
