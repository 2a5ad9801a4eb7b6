"""A device without a diffusion model: keys, envelopes and the broker, nothing else.

Two users: devices too weak to run the UNet (they enrol, send a task vector and ask the
aggregator's generation service for images), and load generators and tests, which drive
the aggregator message by message (and misbehave on purpose) at thousands of devices
per process instead of training a UNet for every update.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from edge_sdk.protocol.codecs import decode_payload, make_codec
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage, RequestRefused
from edge_sdk.protocol.identity import Identity, PublicIdentity, seal_to
from edge_sdk.protocol.messages import (
    SEEDED_CODEC,
    Enrol,
    GenerateRequest,
    GenerateResult,
    RoundStart,
    SeededAdapter,
    UpdateAck,
    UpdateBody,
    read_signed_keys,
)
from edge_sdk.protocol.provisioning import DeviceCredentials
from edge_sdk.protocol.tensors import Shapes, pack_tensors, unpack_tensors
from edge_sdk.protocol.topics import DEFAULT_PREFIX
from edge_sdk.retry import Resender
from edge_sdk.transport import MqttConfig, MqttTransport
from models.digits.unet import BASE_MODEL_DIR

DEMO_TOKEN = "fedaigc-demo-token"  # the fleet token of tests that craft messages (the daemon's `tokens` must list it)


def start_adapter(start: RoundStart, shapes: Shapes,
                  base_model: str | Path = BASE_MODEL_DIR) -> dict[str, torch.Tensor]:
    """The adapter a round start carries whole: encoded, or as the seed to draw it from (on the fleet's
    ``base_model``, whose layers the seed's draw follows).

    A delta needs the adapter it applies to, which a model-less device does not keep.
    """
    if start.base_version >= 0:
        raise ValueError(f"round {start.round} carries a delta against version {start.base_version}")
    if start.codec != SEEDED_CODEC:
        return decode_payload(start.codec, start.adapter, shapes)
    seeded = SeededAdapter.decode(start.adapter)
    adapter = _drawn(json.dumps(start.lora, sort_keys=True), seeded.seed, str(base_model))
    if not seeded.matches(adapter):
        raise RefusedMessage(Refusal.BAD_TENSORS, f"the adapter drawn from seed {seeded.seed} differs from the sender's")
    return {k: v.clone() for k, v in adapter.items()}


@lru_cache(maxsize=4)
def _drawn(lora_json: str, seed: int, base_model: str) -> dict[str, torch.Tensor]:
    from models.backend import load_backend
    from models.lora import draw_adapter, lora_from_dict

    backend = load_backend(base_model)
    return draw_adapter(backend.denoiser, lora_from_dict(json.loads(lora_json), backend.default_targets), seed)


class LiteDevice:
    def __init__(self, mqtt_url: str, device_id: str | None = None, token: str = DEMO_TOKEN,
                 topic_prefix: str = DEFAULT_PREFIX, model: str | None = None, fingerprint: str | None = None,
                 username: str | None = None, password: str | None = None) -> None:
        """``model``: the base model digest to claim at enrolment (default: the one the fleet announces,
        as a model-less device has none of its own). ``fingerprint``: the aggregator keys to accept
        (None: the first announced, for tests that craft messages against a daemon they started).
        ``username``/``password``: the device's broker account, where the broker has them."""
        self.id = device_id or f"lite-{uuid.uuid4().hex[:8]}"
        self.model = model
        self.fingerprint = fingerprint
        self.fleet_model: str | None = None
        self.identity = Identity.generate()
        self.token = token
        self.writer = EnvelopeWriter(self.identity, self.id)
        self.refusals = RefusalCounter()
        self.transport = MqttTransport(MqttConfig(url=mqtt_url, client_id=f"fedaigc-{self.id}", username=username,
                                                  password=password, topic_prefix=topic_prefix), self.refusals)
        self.topics = self.transport.topics
        self.aggregator: PublicIdentity | None = None
        self.aggregator_id = None
        self.inbox: list = []
        self.cond = threading.Condition()
        self.resender: Resender | None = None  # set by publish_update(..., resender=): re-sends until acknowledged

    @classmethod
    def from_bundle(cls, bundle: DeviceCredentials, **kwargs) -> "LiteDevice":
        """A provisioned device: the bundle's id, broker (and account), prefix and token, pinned to its fingerprint."""
        return cls(bundle.broker_url, bundle.device_id, bundle.token, bundle.topic_prefix,
                   fingerprint=bundle.aggregator_fingerprint, username=bundle.mqtt_username,
                   password=bundle.mqtt_password, **kwargs)

    def start(self, timeout: float = 10) -> "LiteDevice":
        self.transport.subscribe(self.topics.aggregator_keys, self._on_keys)  # before connecting: see session.start
        self.transport.subscribe(self.topics.down(self.id), self._on_down, chunked=True)
        self.transport.connect()
        deadline = time.monotonic() + timeout
        while (self.aggregator is None or (self.model or self.fleet_model) is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.aggregator is not None, "no aggregator keys received"
        return self

    def stop(self) -> None:
        self.transport.close()

    def _on_keys(self, topic, data):
        if not data:
            return
        body = read_signed_keys(data)
        keys = PublicIdentity(body.verify_key, body.box_key)
        if self.fingerprint is not None and keys.fingerprint != self.fingerprint:
            raise RefusedMessage(Refusal.UNTRUSTED_KEY, f"aggregator keys {keys.fingerprint} are not the pinned ones")
        self.aggregator = keys
        self.aggregator_id = body.aggregator_id
        self.fleet_model = body.model
        self.verifier = EnvelopeVerifier(lambda s: body.verify_key)

    def _on_down(self, topic, data):
        env = self.verifier.open(data)
        body = self.identity.decrypt_from(self.aggregator.box_key, env.payload)
        if env.type == MessageType.UPDATE_ACK and self.resender is not None:
            self.resender.acknowledged((self.id, UpdateAck.decode(body).round))
        with self.cond:
            self.inbox.append((env, body))
            self.cond.notify_all()

    def wait_for(self, mtype: MessageType, count: int = 1, timeout: float = 30):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [(e, b) for e, b in self.inbox if e.type == mtype]
                if len(found) >= count:
                    return found
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.id}: no {count} x {mtype.value} in {timeout} s")
                self.cond.wait(0.1)

    def round_start(self, index: int = -1, timeout: float = 30) -> RoundStart:
        found = self.wait_for(MessageType.ROUND_START, timeout=timeout)
        return RoundStart.decode(found[index][1])

    def acks(self) -> list[UpdateAck]:
        return [UpdateAck.decode(b) for e, b in self.inbox if e.type == MessageType.UPDATE_ACK]

    # ------------------------------------------------------------ sending
    def send(self, topic: str, envelope: bytes) -> None:
        self.transport.wait_published(self.transport.publish(topic, envelope))

    def enrol(self, lora_rank: int = 0) -> None:
        """Enrol with the fleet token; ``lora_rank``: the rank to train at (0: the fleet's)."""
        pub = self.identity.public
        body = Enrol(self.token, pub.verify_key, pub.box_key, "lite", self.model or self.fleet_model,
                     lora_rank).encode()
        self.send(self.topics.enrol(self.id), self.writer.build(MessageType.ENROL, seal_to(self.aggregator.box_key, body)))

    def send_task(self, vector: np.ndarray) -> None:
        v = torch.from_numpy(np.asarray(vector, dtype=np.float32))
        payload = seal_to(self.aggregator.box_key, pack_tensors({"task": v / v.norm()}))
        self.send(self.topics.task(self.id), self.writer.build(MessageType.TASK, payload))

    def seal_update(self, start: RoundStart, delta: dict[str, torch.Tensor], codec: str = "fp32",
                    samples: int = 10, epsilon: float = -1.0, dp_delta: float = 0.0) -> bytes:
        """The update body for ``start``'s cluster, boxed to the aggregator (what an envelope carries)."""
        body = UpdateBody(start.cluster, codec, make_codec(codec, seed=0).encode(delta), samples, 5, 1.0, 0.5,
                          start.version, epsilon, dp_delta)
        return self.identity.encrypt_to(self.aggregator.box_key, body.encode())

    def update_envelope(self, start: RoundStart, delta: dict[str, torch.Tensor], codec: str = "fp32",
                        samples: int = 10, round: int | None = None, epsilon: float = -1.0,
                        dp_delta: float = 0.0) -> bytes:
        sealed = self.seal_update(start, delta, codec, samples, epsilon, dp_delta)
        return self.writer.build(MessageType.UPDATE, sealed, start.round if round is None else round)

    def publish_update(self, rnd: int, sealed: bytes, resender: Resender | None = None,
                       deadline: float | None = None, rng=None, envelope: bytes | None = None) -> list:
        """Publish round ``rnd``'s ``sealed`` update in a fresh envelope (or ``envelope``, built beforehand);
        with ``resender``, re-send it in fresh envelopes until the aggregator acknowledges it, like
        ``edge_sdk.session`` (keyed ``(device id, round)``, so one resender serves many devices)."""
        topic = self.topics.update(self.id)
        infos = self.transport.publish(topic, envelope or self.writer.build(MessageType.UPDATE, sealed, rnd))
        if resender is not None:
            self.resender = resender
            resender.track((self.id, rnd), lambda: self.transport.publish(
                topic, self.writer.build(MessageType.UPDATE, sealed, rnd)), deadline, rng)
        return infos

    def generate(self, encoding: np.ndarray, mix: dict[int, float], n: int = 1, seed: int = 0,
                 timeout: float = 120.0) -> torch.Tensor:
        """Images from the aggregator's generation service for a (384,) prompt encoding."""
        result = self.generation_result(self.request_generation(encoding, mix, n, seed), timeout)
        if not result.ok:
            raise RequestRefused.from_reply(result.reason)
        return unpack_tensors(result.images)["images"]

    def request_generation(self, encoding: np.ndarray, mix: dict[int, float], n: int = 1, seed: int = 0) -> str:
        """Send a generation request without waiting; returns its request id."""
        rid = uuid.uuid4().hex
        enc = torch.from_numpy(np.asarray(encoding, dtype=np.float32))
        body = GenerateRequest(rid, pack_tensors({"encoding": enc}), {str(c): float(w) for c, w in mix.items()}, n, seed)
        self.send_sealed_request(body.encode())
        return rid

    def send_sealed_request(self, body: bytes) -> None:
        """``body`` sealed to the aggregator in a signed generation request (tests send broken ones)."""
        sealed = seal_to(self.aggregator.box_key, body)
        self.send(self.topics.generate(self.id), self.writer.build(MessageType.GENERATE_REQUEST, sealed))

    def generation_result(self, rid: str, timeout: float = 120.0) -> GenerateResult:
        """The answer to request ``rid`` (or a refusal with no id: one the aggregator could not match)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, (env, raw) in enumerate(self.inbox):
                    if env.type == MessageType.GENERATE_RESULT:
                        result = GenerateResult.decode(raw)
                        if result.request_id == rid or not (result.request_id or result.ok):
                            del self.inbox[i]
                            return result
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no generation result within {timeout} s")
                self.cond.wait(0.05)

    def join(self, vector: np.ndarray, lora_rank: int = 0) -> None:
        self.enrol(lora_rank)
        self.wait_for(MessageType.ENROL_ACK)
        self.send_task(vector)
