"""Topic layout: every topic of a fleet lies under its prefix, and a bad prefix is refused up front."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.config import AggregatorConfig
from edge_sdk.protocol.topics import Topics, device_of
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
