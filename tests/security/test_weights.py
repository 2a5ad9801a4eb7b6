"""Aggregation weights are not trust (issue 17): an enrolled device lying about its sample count.

Against the real daemon on the real broker (each test on a topic prefix of its own), driven by
protocol-level devices that send crafted updates: a huge claim is capped and cannot steer the
step, a claim out of range is refused with a reason, and a close that raises quarantines the
update behind it and closes the round with the rest. The maths of the caps on tiny tensors last.
"""

import uuid

import numpy as np
import pytest
import torch

from aggregator.interaction import update_spread
from aggregator.rules import RULES, AggregationRule, ClientUpdate, SampleBound, bound_samples, make_rule
from aggregator.simulation.lite import LiteDevice, start_adapter
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.protocol.messages import UpdateAck
from models.lora import delta_weight, lora_config, lora_modules, lora_scale
from tests.polling import wait_until
from tests.test_service import make_service


def weight_change(adapter, initial, spec) -> torch.Tensor:
    """The step in ΔW = scale·B·A space, every module concatenated: what the rules average."""
    return torch.cat([(delta_weight(adapter[f"{m}.lora_A.weight"], adapter[f"{m}.lora_B.weight"], lora_scale(spec))
                       - delta_weight(initial[f"{m}.lora_A.weight"], initial[f"{m}.lora_B.weight"],
                                      lora_scale(spec))).flatten().double() for m in lora_modules(initial)])


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def shifted(adapter, delta):
    return {k: adapter[k] + delta[k] for k in adapter}


class Federation:
    """A daemon expecting ``n`` devices in one cluster, the devices joined, round 1 open."""

    def __init__(self, tmp_path, mqtt_url, n: int, **settings) -> None:
        prefix = f"sec{uuid.uuid4().hex[:8]}"
        self.service = make_service(tmp_path, mqtt_url, expected_devices=n, clustering="single", rounds=2,
                                    mqtt_topic_prefix=prefix, **settings)
        self.devices = [LiteDevice(mqtt_url, f"dev{i}-{prefix}", topic_prefix=prefix).start() for i in range(n)]
        vector = np.random.default_rng(0).normal(size=384)
        for d in self.devices:
            d.join(vector)
        self.starts = [d.round_start() for d in self.devices]
        self.initial = start_adapter(self.starts[0], self.service.shapes)  # what round 1 starts from

    def send(self, i: int, delta, samples: int = 10) -> None:
        d = self.devices[i]
        d.send(d.topics.update(d.id), d.update_envelope(self.starts[i], delta, samples=samples))

    def acks(self, i: int) -> list[UpdateAck]:
        return [UpdateAck.decode(b) for _, b in self.devices[i].wait_for(MessageType.UPDATE_ACK)]

    def round_one(self) -> dict:
        wait_until(lambda: self.service.current_round() == 2, 20, "round 1 committed")
        (_, _, summary), = [s for s in self.service.store.round_summaries() if s[0] == 1]
        return summary

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        self.service.stop()


@pytest.fixture
def federation(tmp_path, mqtt_url, request):
    fed = Federation(tmp_path, mqtt_url, **getattr(request, "param", {"n": 3}))
    yield fed
    fed.close()


def honest_deltas(shapes, n: int) -> list[dict[str, torch.Tensor]]:
    """Devices of one cluster: a shared direction plus each device's own noise."""
    g = torch.Generator().manual_seed(1000)
    common = {k: torch.randn(s, generator=g) * 0.02 for k, s in sorted(shapes.items())}
    return [{k: common[k] + 0.005 * torch.randn(common[k].shape, generator=torch.Generator().manual_seed(i))
             for k in common} for i in range(n)], common


# ---------------------------------------------------------------------------------------------- over the broker
@pytest.mark.parametrize("federation", [{"n": 9}], indirect=True)
@pytest.mark.parametrize("claim", [10**12, 2**62])
def test_a_huge_sample_claim_is_capped_and_cannot_steer_the_step(federation, claim):
    fed, spec = federation, federation.service.config.lora
    honest, common = honest_deltas(fed.service.shapes, 8)
    attack = {k: -v for k, v in common.items()}  # the honest direction, reversed
    for i, delta in enumerate(honest):
        fed.send(i, delta)
    fed.send(8, attack, samples=claim)
    summary = fed.round_one()  # 2**62 used to raise ZeroDivisionError in the close, retried forever

    assert sorted(summary["accepted"]) == sorted(d.id for d in fed.devices) and summary["rejected"] == {}
    assert summary["samples"] == 8 * 10 + 3 * 10  # the claim counted as 3 x the median claim
    step = weight_change(fed.service.rounds.cluster_adapter(0)[0], fed.initial, spec)
    honest_mean = torch.stack([weight_change(shifted(fed.initial, d), fed.initial, spec) for d in honest]).mean(0)
    attacker = weight_change(shifted(fed.initial, attack), fed.initial, spec)
    assert cosine(step, honest_mean) > 0.9
    assert cosine(step, attacker) < 0  # was 0.99999999 with weights by raw claims (10**12)


@pytest.mark.parametrize("claim", [2**63, 0, -1])
def test_a_sample_claim_out_of_range_is_refused_with_a_reason_and_counted(federation, claim):
    fed = federation
    before = fed.service.refusals["malformed"]
    fed.send(0, honest_deltas(fed.service.shapes, 1)[0][0], samples=claim)
    (ack,) = fed.acks(0)
    assert (ack.round, ack.accepted, ack.reason) == (1, False, "malformed")
    assert fed.service.refusals["malformed"] == before + 1
    assert fed.service.store.updates(1) == []


class ExplodesOn(AggregationRule):
    """The daemon's rule, except that it raises when ``device``'s update is among those it combines
    (``device`` None: whenever it combines more than one update) - a rule's bug an update triggers."""

    def __init__(self, inner: AggregationRule, device: str | None) -> None:
        self.inner, self.device, self.name = inner, device, f"exploding_{inner.name}"
        self.sample_bound = inner.sample_bound

    def combine(self, current, updates, lora):
        if any(u.device_id == self.device for u in updates) or (self.device is None and len(updates) > 1):
            raise ZeroDivisionError("float division by zero")
        return self.inner.combine(current, updates, lora)


def test_an_update_the_close_raises_on_is_quarantined_and_the_round_closes_with_the_rest(federation):
    fed, spec = federation, federation.service.config.lora
    honest, _ = honest_deltas(fed.service.shapes, 3)
    evil = fed.devices[2].id
    fed.service.rounds.rule = ExplodesOn(fed.service.rounds.rule, evil)
    for i, delta in enumerate(honest):
        fed.send(i, delta)
    summary = fed.round_one()

    assert sorted(summary["accepted"]) == sorted(d.id for d in fed.devices[:2])
    assert summary["rejected"] == {evil: "quarantined"} and "failure" not in summary
    assert fed.service.refusals["quarantined"] == 1
    wait_until(lambda: len(fed.devices[2].wait_for(MessageType.UPDATE_ACK)) == 2, 10, "the quarantine told")
    assert [(a.accepted, a.reason) for a in fed.acks(2)] == [(True, ""), (False, "quarantined")]
    clean = make_rule("exact", 3.0).aggregate(
        fed.initial, [ClientUpdate.from_delta(d.id, fed.initial, honest[i], 10) for i, d in enumerate(fed.devices[:2])],
        spec).adapter
    committed, _ = fed.service.rounds.cluster_adapter(0)
    torch.testing.assert_close(weight_change(committed, fed.initial, spec), weight_change(clean, fed.initial, spec))


def test_a_close_that_fails_on_no_single_update_ends_with_the_adapter_kept_and_a_reason(federation):
    fed = federation
    honest, _ = honest_deltas(fed.service.shapes, 3)
    fed.service.rounds.rule = ExplodesOn(fed.service.rounds.rule, None)
    for i, delta in enumerate(honest):
        fed.send(i, delta)
    summary = fed.round_one()

    assert summary["accepted"] == [] and set(summary["rejected"].values()) == {"quarantined"}
    assert "on none alone" in summary["failure"] and "ZeroDivisionError" in summary["failure"]
    committed, version = fed.service.rounds.cluster_adapter(0)
    assert version == 1 and all(torch.equal(committed[k], fed.initial[k]) for k in committed)
    assert fed.service.rounds.phase(2).value == "open"


# ---------------------------------------------------------------------------------------------- the maths
def test_bound_samples_caps_at_the_maximum_then_at_a_multiple_of_the_lower_median():
    updates = [ClientUpdate(f"d{i}", {}, n) for i, n in enumerate([10, 12, 9, 2**62, 11])]
    assert [u.samples for u in bound_samples(updates, 100, None)] == [10, 12, 9, 100, 11]
    assert [u.samples for u in bound_samples(updates, 100, 3.0)] == [10, 12, 9, 33, 11]
    two = [ClientUpdate("a", {}, 5), ClientUpdate("b", {}, 10**12)]
    assert [u.samples for u in bound_samples(two, 100_000, 3.0)] == [5, 15]  # of two, the larger is capped


def test_a_sample_bound_out_of_range_is_refused():
    for bad in ({"max_samples": 0}, {"max_samples": 2**31}, {"median_multiple": 0.5},
                {"median_multiple": float("inf")}):
        with pytest.raises(ValueError):
            SampleBound(**bad)


SPEC = lora_config(2, target_modules=("m",))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_weights_by_the_bounded_claim(rule):
    g = torch.Generator().manual_seed(0)
    current = {"m.lora_A.weight": torch.randn(2, 6, generator=g), "m.lora_B.weight": torch.zeros(5, 2)}
    direction = torch.randn(5, 2, generator=g)
    honest = [ClientUpdate(f"h{i}", {"m.lora_A.weight": current["m.lora_A.weight"],
                                     "m.lora_B.weight": direction + 0.1 * torch.randn(5, 2, generator=g)}, 10)
              for i in range(8)]
    attacker = ClientUpdate("evil", {"m.lora_A.weight": current["m.lora_A.weight"],
                                     "m.lora_B.weight": -direction}, 10**12)
    result = make_rule(rule, 3.0).aggregate(current, honest + [attacker], SPEC)
    step = weight_change(result.adapter, current, SPEC)
    assert cosine(step, weight_change(attacker.adapter, current, SPEC)) < 0
    assert result.samples["evil"] == 30


def test_the_spread_of_one_device_holding_all_the_weight_is_unknown_not_a_division_by_zero():
    a = {"m.lora_A.weight": torch.ones(2, 6), "m.lora_B.weight": torch.ones(5, 2)}
    updates = [ClientUpdate("big", a, 2**62), ClientUpdate("small", a, 1)]
    assert update_spread(updates, SPEC) is None
