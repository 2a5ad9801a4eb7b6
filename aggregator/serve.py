"""The generation service: sampling on behalf of devices too weak to run the model.

A device sends a signed envelope whose sealed body holds a prompt encoding, a mix over
cluster adapters, a sample count and a seed; it receives the images encrypted to its
own key. Requests queue here and are served in batches: everything that arrived within
``max_wait_s`` (up to ``max_batch`` images) is grouped by mix, and each group runs as one
batched sampling call on the global model. Batching matters because a 16x16 UNet step
costs nearly the same for 1 image as for 32 on a CPU: per-call overhead dominates.

Sampling is the costliest thing a device can ask for, so it is metered: at most ``max_queue``
images wait, and each device draws from its own token bucket (``aggregator/ratelimit.py``). A
request over either is answered ``busy`` at once, never queued. Every refused request gets a
``GenerateResult`` with the reason, so no device waits for its timeout.

A hybrid request (``server_steps`` of ``steps``) is served the same way, but only its first steps run
here and it is answered with the undecoded samples, which the device finishes with its own adapters
(``EdgeClient.generate``). Requests with another step count or split batch apart: one sampling call
walks one schedule.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from aggregator.global_model import GlobalModel
from aggregator.outbox import Outbox
from aggregator.ratelimit import TokenBuckets
from aggregator.telemetry import Telemetry
from edge_sdk.protocol.envelope import EnvelopeVerifier, MessageType
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import MAX_IMAGES_PER_REQUEST, MAX_SAMPLING_STEPS, GenerateRequest, GenerateResult
from edge_sdk.protocol.tensors import pack_tensors, unpack_tensors

log = logging.getLogger("fedaigc.serve")


@dataclass
class Request:
    device: str
    request_id: str
    encoding: torch.Tensor  # one prompt's conditioning, backend.conditioning_shape
    mix: dict[int, float]
    n: int
    seed: int
    received: float
    steps: int = 0         # 0: the service's own
    server_steps: int = 0  # hybrid: the steps run here, answered as undecoded samples; 0: finished images

    @property
    def hybrid(self) -> bool:
        return self.server_steps > 0


Reply = Callable[[Request, torch.Tensor | None, RefusedMessage | None], None]
"""Images (samples, for a hybrid request) for a request, or None and the refusal that stopped them."""


class GenerationService:
    def __init__(self, model: GlobalModel, reply: Reply, *, max_batch: int = 64, max_wait_s: float = 0.05,
                 steps: int = 20, guidance_scale: float = 2.0, max_queue: int = 256,
                 device_rate: float | None = None, device_burst: int = MAX_IMAGES_PER_REQUEST) -> None:
        """``max_queue``: images waiting at most; ``device_rate``: images per minute per device (None: no
        per-device limit), of which ``device_burst`` may come at once."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model = model
        self.reply = reply
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.max_queue = max_queue
        self.rate = None if device_rate is None else TokenBuckets(device_rate, device_burst)
        self.batches: list[int] = []  # images per sampling call, for the benchmark
        self.waiting = 0  # images queued and not yet in a sampling call
        self.high_water = 0  # the most images that ever waited
        self._waiting_lock = threading.Lock()
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> "GenerationService":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def submit(self, request: Request) -> None:
        """Validate and queue; refuses (``RefusedMessage``) a request that cannot be served, ``busy`` one
        that would overfill the queue or exceed its device's rate."""
        if not 1 <= request.n <= MAX_IMAGES_PER_REQUEST:
            raise RefusedMessage(Refusal.MALFORMED, f"n must be between 1 and {MAX_IMAGES_PER_REQUEST}, "
                                                    f"got {request.n}")
        if not 0 <= request.server_steps <= (request.steps or self.steps) <= MAX_SAMPLING_STEPS:
            raise RefusedMessage(Refusal.MALFORMED, f"server_steps {request.server_steps} of {request.steps} steps: "
                                                    f"need 0 <= server_steps <= steps <= {MAX_SAMPLING_STEPS}")
        expected = self.model.backend.conditioning_shape
        if tuple(request.encoding.shape) != expected:
            raise RefusedMessage(Refusal.BAD_TENSORS, f"conditioning must have shape {expected}, "
                                                      f"got {tuple(request.encoding.shape)}")
        try:
            self.model.check_mix(request.mix)
        except ValueError as e:
            raise RefusedMessage(Refusal.MALFORMED, str(e)) from None
        with self._waiting_lock:
            if self.waiting + request.n > self.max_queue:
                raise RefusedMessage(Refusal.BUSY, f"{self.waiting} images are waiting (at most {self.max_queue})")
            # an image costs its share of the steps run here: a device asking for more steps than the
            # service's own pays for them (never less than one image's worth)
            cost = request.n * max(1.0, (request.server_steps or request.steps or self.steps) / self.steps)
            if self.rate is not None and not self.rate.take(request.device, cost):
                raise RefusedMessage(Refusal.BUSY, f"{request.device} asked for more than "
                                                   f"{self.rate.per_second * 60:g} images a minute")
            self.waiting += request.n
            self.high_water = max(self.high_water, self.waiting)
        self._queue.put(request)

    def _taken(self, request: Request) -> Request:
        with self._waiting_lock:
            self.waiting -= request.n
        return request

    def _collect(self) -> list[Request] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch, images = [self._taken(first)], first.n
        deadline = time.monotonic() + self.max_wait_s
        while images < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            batch.append(self._taken(item))
            images += item.n
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            groups: dict[tuple, list[Request]] = {}
            for r in batch:  # one sampling call runs one schedule: requests of other step counts wait apart
                groups.setdefault((tuple(sorted(r.mix.items())), r.steps or self.steps, r.server_steps), []).append(r)
            for (mix, steps, server_steps), requests in groups.items():
                self._serve_group(dict(mix), requests, steps, server_steps)

    def _serve_group(self, mix: dict[int, float], requests: list[Request], steps: int, server_steps: int) -> None:
        """One batched sampling call; ``server_steps`` > 0 stops there and answers samples, not images."""
        conditioning = torch.cat([r.encoding.expand(r.n, *r.encoding.shape) for r in requests])
        # each request's starting noise comes from its own seed: its images do not depend on its batch-mates
        shape = self.model.backend.sample_shape
        noise = torch.cat([torch.randn((r.n, *shape), generator=torch.Generator().manual_seed(r.seed))
                           for r in requests])
        try:
            samples = self.model.sample(conditioning, mix, steps=steps, guidance_scale=self.guidance_scale,
                                        noise=noise, stop=server_steps or steps)
            images = samples if server_steps else self.model.backend.decode(samples)
        except Exception as e:  # a failed sampling call must not take the service down
            log.exception("generation failed")
            refusal = RefusedMessage(Refusal.UNAVAILABLE, f"generation failed: {type(e).__name__}")
            for r in requests:
                self.reply(r, None, refusal)
            return
        self.batches.append(len(conditioning))
        start = 0
        for r in requests:
            self.reply(r, images[start:start + r.n], None)
            start += r.n


class GenerationEndpoint:
    """Sealed generation requests in, images encrypted to the requesting device out, served in batches.

    Every refusal of an authenticated request is answered with its reason. A body that cannot be
    read has no request id to answer to: the reply then carries an empty id, which fails every
    request the device is waiting on (they were sealed the same way, e.g. to a key this
    aggregator does not hold). A request on another device's topic was not put there by its
    signer, so it is refused unanswered.
    """

    def __init__(self, model: GlobalModel, verifier: EnvelopeVerifier, identity: Identity, outbox: Outbox,
                 telemetry: Telemetry, refusals: RefusalCounter, **service_options) -> None:
        self.verifier, self.identity, self.outbox, self.telemetry = verifier, identity, outbox, telemetry
        self.refusals = refusals
        self.service = GenerationService(model, self.reply, **service_options)

    def on_request(self, topic: str, data: bytes) -> None:
        env = self.verifier.open(data, {MessageType.GENERATE_REQUEST}, topic)
        self.telemetry.count(0, env.sender, "up", len(data))
        request_id = ""
        try:
            body = GenerateRequest.decode(self.identity.open_sealed(env.payload))
            request_id = body.request_id
            self.service.submit(self._request(env.sender, body))
        except RefusedMessage as e:
            self._answer(env.sender, request_id, None, e)

    def _request(self, device: str, body: GenerateRequest) -> Request:
        encoding = unpack_tensors(body.encoding,
                                  {"encoding": self.service.model.backend.conditioning_shape})["encoding"]
        try:
            mix = {int(c): float(w) for c, w in body.mix.items()}
        except ValueError:
            raise RefusedMessage(Refusal.MALFORMED, f"mix keys must be cluster ids, got {list(body.mix)[:3]}") from None
        return Request(device, body.request_id, encoding, mix, body.n, body.seed, time.monotonic(), body.steps,
                       body.server_steps)

    def reply(self, request: Request, images: torch.Tensor | None, refusal: RefusedMessage | None) -> None:
        self._answer(request.device, request.request_id, images, refusal, "samples" if request.hybrid else "images")

    def _answer(self, device: str, request_id: str, images: torch.Tensor | None,
                refusal: RefusedMessage | None, name: str = "images") -> None:
        if refusal is not None:
            self.refusals.record(refusal, f"generation request {request_id[:32]!r} of {device}")
        payload = b"" if images is None else pack_tensors({name: images})
        reason = "" if refusal is None else str(refusal)[:500]
        self.outbox.send(device, MessageType.GENERATE_RESULT,
                         GenerateResult(request_id, images is not None, reason, payload).encode())
