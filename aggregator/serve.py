"""The generation service: sampling on behalf of devices too weak to run the model.

A device sends a signed envelope whose sealed body holds a prompt encoding, a mix over
cluster adapters, a sample count and a seed; it receives the images encrypted to its
own key. Requests queue here and are served in batches: everything that arrived within
``max_wait_s`` (up to ``max_batch`` images) is grouped by mix, and each group runs as one
batched sampling call on the global model. Batching matters because a 16x16 UNet step
costs nearly the same for 1 image as for 32 on a CPU: per-call overhead dominates.
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
from aggregator.telemetry import Telemetry
from edge_sdk.protocol.envelope import EnvelopeVerifier, MessageType
from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import MAX_IMAGES_PER_REQUEST, GenerateRequest, GenerateResult
from edge_sdk.protocol.tensors import pack_tensors, unpack_tensors
from edge_sdk.protocol.topics import check_sender

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


Reply = Callable[[Request, torch.Tensor | None, str], None]


class GenerationService:
    def __init__(self, model: GlobalModel, reply: Reply, *, max_batch: int = 64, max_wait_s: float = 0.05,
                 steps: int = 20, guidance_scale: float = 2.0) -> None:
        self.model = model
        self.reply = reply
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.batches: list[int] = []  # images per sampling call, for the benchmark
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> "GenerationService":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def submit(self, request: Request) -> None:
        """Validate and queue; raises ValueError with the reason for a request that cannot be served."""
        if not 1 <= request.n <= MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"n must be between 1 and {MAX_IMAGES_PER_REQUEST}, got {request.n}")
        expected = self.model.backend.conditioning_shape
        if tuple(request.encoding.shape) != expected:
            raise ValueError(f"conditioning must have shape {expected}, got {tuple(request.encoding.shape)}")
        self.model.check_mix(request.mix)
        self._queue.put(request)

    def _collect(self) -> list[Request] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch, images = [first], first.n
        deadline = time.monotonic() + self.max_wait_s
        while images < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            batch.append(item)
            images += item.n
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            groups: dict[tuple, list[Request]] = {}
            for r in batch:
                groups.setdefault(tuple(sorted(r.mix.items())), []).append(r)
            for key, requests in groups.items():
                self._serve_group(dict(key), requests)

    def _serve_group(self, mix: dict[int, float], requests: list[Request]) -> None:
        conditioning = torch.cat([r.encoding.expand(r.n, *r.encoding.shape) for r in requests])
        # each request's starting noise comes from its own seed: its images do not depend on its batch-mates
        shape = self.model.backend.sample_shape
        noise = torch.cat([torch.randn((r.n, *shape), generator=torch.Generator().manual_seed(r.seed))
                           for r in requests])
        try:
            images = self.model.generate(conditioning, mix, steps=self.steps, guidance_scale=self.guidance_scale,
                                         noise=noise)
        except Exception as e:  # a failed sampling call must not take the service down
            log.exception("generation failed")
            for r in requests:
                self.reply(r, None, f"generation failed: {type(e).__name__}")
            return
        self.batches.append(len(conditioning))
        start = 0
        for r in requests:
            self.reply(r, images[start:start + r.n], "")
            start += r.n


class GenerationEndpoint:
    """Sealed generation requests in, images encrypted to the requesting device out, served in batches."""

    def __init__(self, model: GlobalModel, verifier: EnvelopeVerifier, identity: Identity, outbox: Outbox,
                 telemetry: Telemetry, *, max_batch: int, max_wait_s: float) -> None:
        self.verifier, self.identity, self.outbox, self.telemetry = verifier, identity, outbox, telemetry
        self.service = GenerationService(model, self.reply, max_batch=max_batch, max_wait_s=max_wait_s)

    def on_request(self, topic: str, data: bytes) -> None:
        env = self.verifier.open(data, {MessageType.GENERATE_REQUEST})
        check_sender(topic, env.sender)
        body = GenerateRequest.decode(self.identity.open_sealed(env.payload))
        encoding = unpack_tensors(body.encoding,
                                  {"encoding": self.service.model.backend.conditioning_shape})["encoding"]
        try:
            mix = {int(c): float(w) for c, w in body.mix.items()}
        except ValueError:
            raise RefusedMessage(Refusal.MALFORMED, f"mix keys must be cluster ids, got {list(body.mix)[:3]}") from None
        self.telemetry.count(0, env.sender, "up", len(data))
        request = Request(env.sender, body.request_id, encoding, mix, body.n, body.seed, time.monotonic())
        try:
            self.service.submit(request)
        except ValueError as e:
            self.reply(request, None, str(e))
            raise RefusedMessage(Refusal.MALFORMED, f"generation request from {env.sender}: {e}") from None

    def reply(self, request: Request, images: torch.Tensor | None, reason: str) -> None:
        payload = b"" if images is None else pack_tensors({"images": images})
        body = GenerateResult(request.request_id, images is not None, reason, payload)
        self.outbox.send(request.device, MessageType.GENERATE_RESULT, body.encode())
