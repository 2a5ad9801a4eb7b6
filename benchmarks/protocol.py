"""Envelope cost and robustness: throughput vs raw safetensors, and a mutation fuzz run.

    python -m benchmarks.protocol [--quick | --smoke] [--out DIR]

Throughput: the same adapter-sized tensors through (a) ``safetensors`` serialisation
alone and (b) the full send path as a device runs it (fp32 update codec -> msgpack body
-> Box encryption -> signed envelope) and receive path as the aggregator runs it (parse
-> verify -> decrypt -> decode -> validate against the adapter layout), in one process.
Fuzzing: >= 100,000 envelopes of every message type a device sends (enrolment, task
vector, update, generation request, status), each built as devices build it, mutated
(bit flips, byte overwrites, truncation, extension, splices) and fed to the parsers the
aggregator runs on that message's topic; every outcome must be an acceptance of the
untouched original or a typed refusal. Writes benchmarks/results/protocol.json and
protocol.png.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from aggregator.config import AggregatorConfig  # noqa: E402
from benchmarks._results import Output, add_arguments  # noqa: E402
from edge_sdk.artifacts.manifest import model_digest, part_digests  # noqa: E402
from edge_sdk.protocol.codecs import decode_payload, make_codec  # noqa: E402
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType  # noqa: E402
from edge_sdk.protocol.errors import Refusal, RefusedMessage  # noqa: E402
from edge_sdk.protocol.identity import Identity, seal_to  # noqa: E402
from edge_sdk.protocol.messages import DeviceStatus, Enrol, GenerateRequest, UpdateBody  # noqa: E402
from edge_sdk.protocol.tensors import pack_tensors, shapes_of, unpack_tensors  # noqa: E402
from edge_sdk.protocol.topics import Topics, check_sender  # noqa: E402
from models.digits.backend import DigitsBackend  # noqa: E402
from models.lora import add_adapter, get_adapter_state, lora_config  # noqa: E402
from models.text import EMBEDDING_DIM  # noqa: E402

DEVICE = "dev-1"
TOKEN = "fedaigc-benchmark-token"


def adapter_tensors(rank: int) -> dict[str, torch.Tensor]:
    unet = DigitsBackend.from_pretrained().denoiser
    add_adapter(unet, "a", lora_config(rank))
    return {k: torch.randn_like(v) for k, v in get_adapter_state(unet, "a").items()}


def _unit(n: int) -> torch.Tensor:
    v = torch.randn(n)
    return v / v.norm()


class Pipeline:
    """A device's sending side and the aggregator's receiving side, built from the same protocol
    functions as ``edge_sdk.session`` and ``aggregator.intake`` (the intakes' state-store steps left out)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.device, self.aggregator = Identity.generate(), Identity.generate()
        self.writer = EnvelopeWriter(self.device, DEVICE)
        self.model = model_digest(part_digests(DigitsBackend.from_pretrained()))  # what a device enrols with
        self.shapes = shapes_of(tensors)
        self.tensors = tensors
        self.codecs = set(AggregatorConfig().uplink_codecs)
        topics = Topics()
        self.topic_of = {MessageType.ENROL: topics.enrol, MessageType.TASK: topics.task,
                         MessageType.UPDATE: topics.update, MessageType.GENERATE_REQUEST: topics.generate,
                         MessageType.STATUS: topics.device_status}
        self.bodies = {MessageType.ENROL: self._enrol, MessageType.TASK: self._task, MessageType.UPDATE: self._update,
                       MessageType.GENERATE_REQUEST: self._generate, MessageType.STATUS: self._status}

    def verifier(self) -> EnvelopeVerifier:
        return EnvelopeVerifier(lambda s: self.device.public.verify_key if s == DEVICE else _unknown(s),
                                window_ms=10**12)

    # ---------------------------------------------------------------- what a device sends
    def send_update(self, tensors) -> bytes:
        payload = make_codec("fp32").encode(tensors)
        body = UpdateBody(0, "fp32", payload, 60, 20, 0.5, 0.4, 3, -1.0, 0.0).encode()
        return self.writer.build(MessageType.UPDATE, self._boxed(body), 1)

    def templates(self) -> dict[MessageType, bytes]:
        """One envelope of each type a device sends, with the body a real device puts in it."""
        pub, box, build = self.device.public, self.aggregator.public.box_key, self.writer.build
        enrol = Enrol(TOKEN, pub.verify_key, pub.box_key, "simulator", self.model).encode()
        task = pack_tensors({"task": _unit(EMBEDDING_DIM)})
        request = GenerateRequest("req-1", pack_tensors({"encoding": torch.randn(EMBEDDING_DIM)}), {"0": 1.0}, 1, 0)
        status = DeviceStatus("need_full", 1).encode()
        return {
            MessageType.ENROL: build(MessageType.ENROL, seal_to(box, enrol)),
            MessageType.TASK: build(MessageType.TASK, seal_to(box, task)),
            MessageType.UPDATE: self.send_update(self.tensors),
            MessageType.GENERATE_REQUEST: build(MessageType.GENERATE_REQUEST, seal_to(box, request.encode())),
            MessageType.STATUS: build(MessageType.STATUS, self._boxed(status), 1),
        }

    def _boxed(self, body: bytes) -> bytes:
        return self.device.encrypt_to(self.aggregator.public.box_key, body)

    # ---------------------------------------------------------------- what the aggregator does with it
    def receive(self, verifier: EnvelopeVerifier, data: bytes, topic_type: MessageType = MessageType.UPDATE):
        """Parse ``data`` as it arrived on the device's ``topic_type`` topic; refuses with RefusedMessage."""
        if topic_type == MessageType.ENROL:  # self-signed: authenticated by the key inside, once opened
            env = verifier.parse(data, {topic_type})
        else:
            env = verifier.open(data, {topic_type})
        check_sender(self.topic_of[topic_type](DEVICE), env.sender)
        return self.bodies[topic_type](verifier, env)

    def _enrol(self, verifier, env):
        body = Enrol.decode(self.aggregator.open_sealed(env.payload))
        verifier.authenticate(env, body.verify_key)
        return body

    def _task(self, verifier, env):
        vector = unpack_tensors(self.aggregator.open_sealed(env.payload), {"task": (EMBEDDING_DIM,)})["task"]
        if float(vector.norm()) == 0.0:
            raise RefusedMessage(Refusal.MALFORMED, "task vector is all zeros")
        return vector

    def _update(self, verifier, env):
        body = UpdateBody.decode(self.aggregator.decrypt_from(self.device.public.box_key, env.payload))
        return decode_payload(body.codec, body.tensors, self.shapes, self.codecs)

    def _generate(self, verifier, env):
        body = GenerateRequest.decode(self.aggregator.open_sealed(env.payload))
        unpack_tensors(body.encoding, {"encoding": (EMBEDDING_DIM,)})
        try:
            return {int(c): float(w) for c, w in body.mix.items()}
        except ValueError:
            raise RefusedMessage(Refusal.MALFORMED, "mix keys must be cluster ids") from None

    def _status(self, verifier, env):
        status = DeviceStatus.decode(self.aggregator.decrypt_from(self.device.public.box_key, env.payload))
        if status.state != "need_full":
            raise RefusedMessage(Refusal.MALFORMED, f"unknown device status {status.state[:40]!r}")
        return status


def _unknown(sender: str) -> bytes:
    raise RefusedMessage(Refusal.UNKNOWN_SENDER, sender)


def throughput(p: Pipeline, seconds: float) -> dict:
    """MB of adapter tensors per second through safetensors alone, and through the whole envelope path."""
    raw = st_save(p.tensors)
    size = len(raw)

    def rate(fn) -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return n * size / (time.perf_counter() - start) / 1e6

    raw_rate = rate(lambda: st_load(st_save(p.tensors)))
    envelope_rate = rate(lambda: p.receive(p.verifier(), p.send_update(p.tensors)))
    return {"safetensors_bytes": size, "payload_bytes": len(make_codec("fp32").encode(p.tensors)),
            "envelope_bytes": len(p.send_update(p.tensors)),
            "raw_mb_per_s": raw_rate, "envelope_mb_per_s": envelope_rate, "envelope_vs_raw": envelope_rate / raw_rate}


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # byte overwrites
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 2:  # truncation
        b = b[: rng.randrange(len(b))]
    elif kind == 3:  # extension
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 4:  # splice a chunk elsewhere
        i, j = sorted(rng.sample(range(len(b)), 2))
        k = rng.randrange(len(b))
        b[k:k] = b[i:j]
    else:  # header-area overwrite (type, sender, round, nonce live in the first ~100 bytes)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(min(len(b), 100))] = rng.randrange(256)
    return bytes(b)


def fuzz(p: Pipeline, cases: int, seed: int) -> dict:
    """Mutate each type's real envelope in turn and feed it to that topic's parsers: refusals must be typed."""
    rng = random.Random(seed)
    templates = list(p.templates().items())
    for topic_type, original in templates:  # a parser refusing an untouched envelope means the benchmark is stale
        p.receive(p.verifier(), original, topic_type)
    reasons: Counter[str] = Counter()
    crashes: list[str] = []
    accepted_originals = 0
    for i in tqdm(range(cases), desc="fuzz", mininterval=1.0):
        topic_type, original = templates[i % len(templates)]
        data = mutate(original, rng)
        verifier = p.verifier()  # fresh: replay refusal is tested separately; here every case is new
        try:
            p.receive(verifier, data, topic_type)
            if data == original:
                accepted_originals += 1
            else:
                reasons["accepted_mutation"] += 1
        except RefusedMessage as e:
            reasons[e.reason.value] += 1
        except Exception as e:  # anything else is a crash: the pipeline promised typed refusals
            crashes.append(f"{topic_type.value}: {type(e).__name__}: {e}"[:200])
    return {"fuzz_cases": cases, "fuzz_message_types": [t.value for t, _ in templates], "fuzz_crashes": len(crashes),
            "crash_examples": crashes[:10], "refusals_by_reason": dict(reasons),
            "accepted_untouched": accepted_originals}


def plot(result: dict, out: Output) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    labels = list(result["throughput"])
    axes[0].bar([f"{lb}\nraw" for lb in labels] + [f"{lb}\nenvelope" for lb in labels],
                [result["throughput"][lb]["raw_mb_per_s"] for lb in labels]
                + [result["throughput"][lb]["envelope_mb_per_s"] for lb in labels])
    axes[0].set(ylabel="MB/s (encode + decode)", title="safetensors vs full envelope path")
    reasons = sorted(result["refusals_by_reason"].items(), key=lambda kv: -kv[1])
    axes[1].barh([k for k, _ in reasons], [v for _, v in reasons])
    axes[1].set(xscale="log", title=f"{result['fuzz_cases']:,} mutated envelopes: {result['fuzz_crashes']} crashes")
    out.save_figure(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 fuzz cases, short timing")
    parser.add_argument("--cases", type=int, default=100_000, help="mutated envelopes to feed the parsers")
    add_arguments(parser)
    args = parser.parse_args()
    out = Output.of(parser, args, "protocol")
    cases, seconds = (200, 0.05) if args.smoke else (10_000, 1.0) if args.quick else (args.cases, 3.0)
    result: dict = {"throughput": {}}
    for rank in (2, 16):
        p = Pipeline(adapter_tensors(rank))
        result["throughput"][f"rank{rank}"] = throughput(p, seconds)
        print(rank, result["throughput"][f"rank{rank}"], flush=True)
    p = Pipeline(adapter_tensors(2))
    result |= fuzz(p, cases, seed=0)
    result["envelope_mb_per_s"] = result["throughput"]["rank16"]["envelope_mb_per_s"]
    result["raw_mb_per_s"] = result["throughput"]["rank16"]["raw_mb_per_s"]
    out.write(result)
    plot(result, out)
    print(json.dumps({k: v for k, v in result.items() if k != "crash_examples"}, indent=2))


if __name__ == "__main__":
    main()
