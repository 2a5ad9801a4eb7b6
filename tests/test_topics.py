"""Topic layout: every topic of a fleet lies under its prefix, and a bad prefix is refused up front."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.config import AggregatorConfig
from edge_sdk.protocol.errors import RefusedMessage
from edge_sdk.protocol.topics import MAX_DEVICE_ID, Topics, check_device_id, check_sender, device_of
from edge_sdk.transport import MqttConfig

level = st.text(st.characters(exclude_characters="/+#\x00", exclude_categories=("Cs",)), min_size=1, max_size=8)
prefixes = st.lists(level, min_size=1, max_size=3).map("/".join).filter(lambda p: not p.startswith("$"))


@given(prefix=prefixes, device=level)
def test_every_topic_lies_under_the_prefix_and_names_its_device(prefix, device):
    t = Topics(prefix)
    per_device = [t.enrol, t.task, t.update, t.generate, t.device_status, t.down, t.status, t.rollout_report,
                  t.cloud_enrol, t.cloud_up, t.cloud_down]
    for topic in [f(device) for f in per_device]:
        assert topic.startswith(f"{prefix}/v1/")
        assert device_of(topic) == device
    assert t.aggregator_keys.startswith(f"{prefix}/v1/")


@pytest.mark.parametrize("prefix", ["", "fleet/+", "#", "a/#", "$SYS", "a//b", "/a", "a/", "a\x00b"])
def test_a_prefix_that_would_widen_or_escape_subscriptions_is_refused(prefix):
    with pytest.raises(ValueError, match="topic prefix"):
        Topics(prefix)
    with pytest.raises(ValueError, match="topic prefix"):
        MqttConfig(topic_prefix=prefix)
    with pytest.raises(ValueError, match="topic prefix"):
        AggregatorConfig(mqtt_topic_prefix=prefix)


def test_the_default_layout_is_the_documented_one():
    assert Topics().update("d1") == "fedaigc/v1/up/update/d1"
    assert Topics("tenant/acme").aggregator_keys == "tenant/acme/v1/aggregator/keys"


BAD_IDS = ["", "a/b", "+", "dev#", "$SYS", "dev$1", "a\x00b", "x" * (MAX_DEVICE_ID + 1)]


@pytest.mark.parametrize("device_id", BAD_IDS)
def test_a_device_id_that_is_not_one_plain_topic_level_is_refused(device_id):
    with pytest.raises(ValueError, match="device id"):
        check_device_id(device_id)


@pytest.mark.parametrize("device_id", BAD_IDS[1:])
def test_a_sender_whose_id_is_not_one_plain_level_is_refused_as_malformed(device_id):
    with pytest.raises(RefusedMessage, match="malformed: a device id"):
        check_sender(f"fedaigc/v1/up/update/{device_id}", device_id)


@given(device=level.filter(lambda d: "$" not in d))
def test_every_plain_level_is_a_device_id(device):
    assert check_device_id(device) == device
