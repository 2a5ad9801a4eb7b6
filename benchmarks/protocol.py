"""Envelope cost and robustness: throughput vs raw safetensors, and a mutation fuzz run.

    python -m benchmarks.protocol [--quick]

Throughput: the same adapter-sized tensors through (a) ``safetensors`` serialisation
alone and (b) the full send path (safetensors -> msgpack body -> Box encryption ->
signed envelope) and receive path (parse -> verify -> decrypt -> decode -> validate),
in one process. Fuzzing: >= 100,000 envelopes of every message type, mutated (bit
flips, byte overwrites, truncation, extension, splices), fed to the aggregator's
receive pipeline; every outcome must be an acceptance of the untouched original or a
typed refusal. Writes benchmarks/results/protocol.json and protocol.png.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from edge_sdk.protocol.codecs import decode_payload  # noqa: E402
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType  # noqa: E402
from edge_sdk.protocol.errors import RefusedMessage  # noqa: E402
from edge_sdk.protocol.identity import Identity, seal_to  # noqa: E402
from edge_sdk.protocol.messages import UpdateBody  # noqa: E402
from edge_sdk.protocol.tensors import pack_tensors, shapes_of, unpack_tensors  # noqa: E402
from models.digits.unet import load_base_unet  # noqa: E402
from models.lora import add_adapter, get_adapter_state, lora_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def adapter_tensors(rank: int) -> dict[str, torch.Tensor]:
    unet = load_base_unet()
    add_adapter(unet, "a", lora_config(rank))
    return {k: torch.randn_like(v) for k, v in get_adapter_state(unet, "a").items()}


class Pipeline:
    """Sender and receiver sides exactly as device and aggregator run them."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.device, self.aggregator = Identity.generate(), Identity.generate()
        self.writer = EnvelopeWriter(self.device, "dev-1")
        self.shapes = shapes_of(tensors)
        self.tensors = tensors

    def verifier(self) -> EnvelopeVerifier:
        return EnvelopeVerifier(lambda s: self.device.public.verify_key if s == "dev-1" else
                                _unknown(s), window_ms=10**12)

    def send_update(self, tensors) -> bytes:
        body = UpdateBody(0, "fp32", pack_tensors(tensors), 60, 20, 0.5, 0.4, 3, -1.0, 0.0).encode()
        return self.writer.build(MessageType.UPDATE, self.device.encrypt_to(self.aggregator.public.box_key, body), 1)

    def receive(self, verifier: EnvelopeVerifier, data: bytes):
        env = verifier.open(data)
        if env.type == MessageType.UPDATE:
            body = UpdateBody.decode(self.aggregator.decrypt_from(self.device.public.box_key, env.payload))
            return decode_payload(body.codec, body.tensors, self.shapes)
        if env.type in (MessageType.TASK, MessageType.GENERATE_REQUEST, MessageType.ENROL):
            return unpack_tensors(self.aggregator.open_sealed(env.payload), None)
        return self.aggregator.decrypt_from(self.device.public.box_key, env.payload)


def _unknown(sender: str) -> bytes:
    from edge_sdk.protocol.errors import Refusal

    raise RefusedMessage(Refusal.UNKNOWN_SENDER, sender)


def throughput(p: Pipeline, seconds: float) -> dict:
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
    return {"payload_bytes": size, "envelope_bytes": len(p.send_update(p.tensors)),
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
    rng = random.Random(seed)
    small = {k: v for k, v in list(p.tensors.items())[:4]}
    templates = []
    for mtype in MessageType:
        if mtype == MessageType.UPDATE:
            templates.append(p.send_update(p.tensors))
        elif mtype in (MessageType.TASK, MessageType.GENERATE_REQUEST, MessageType.ENROL):
            payload = seal_to(p.aggregator.public.box_key, pack_tensors(small))
            templates.append(p.writer.build(mtype, payload))
        else:
            templates.append(p.writer.build(mtype, p.device.encrypt_to(p.aggregator.public.box_key, b"body")))
    reasons: Counter[str] = Counter()
    crashes: list[str] = []
    accepted_originals = 0
    for i in tqdm(range(cases), desc="fuzz", mininterval=1.0):
        original = templates[i % len(templates)]
        data = mutate(original, rng)
        verifier = p.verifier()  # fresh: replay refusal is tested separately; here every case is new
        try:
            p.receive(verifier, data)
            if data == original:
                accepted_originals += 1
            else:
                reasons["accepted_mutation"] += 1
        except RefusedMessage as e:
            reasons[e.reason.value] += 1
        except Exception as e:  # anything else is a crash: the pipeline promised typed refusals
            crashes.append(f"{type(e).__name__}: {e}"[:200])
    return {"fuzz_cases": cases, "fuzz_crashes": len(crashes), "crash_examples": crashes[:10],
            "refusals_by_reason": dict(reasons), "accepted_untouched": accepted_originals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 fuzz cases, short timing")
    parser.add_argument("--cases", type=int, default=100_000)
    args = parser.parse_args()
    cases = 10_000 if args.quick else args.cases
    result: dict = {"throughput": {}}
    for rank in (2, 16):
        p = Pipeline(adapter_tensors(rank))
        result["throughput"][f"rank{rank}"] = throughput(p, 1.0 if args.quick else 3.0)
        print(rank, result["throughput"][f"rank{rank}"], flush=True)
    p = Pipeline(adapter_tensors(2))
    result |= fuzz(p, cases, seed=0)
    result["envelope_mb_per_s"] = result["throughput"]["rank16"]["envelope_mb_per_s"]
    result["raw_mb_per_s"] = result["throughput"]["rank16"]["raw_mb_per_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "protocol.json").write_text(json.dumps(result, indent=2) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    labels = list(result["throughput"])
    axes[0].bar([f"{lb}\nraw" for lb in labels] + [f"{lb}\nenvelope" for lb in labels],
                [result["throughput"][lb]["raw_mb_per_s"] for lb in labels]
                + [result["throughput"][lb]["envelope_mb_per_s"] for lb in labels])
    axes[0].set(ylabel="MB/s (encode + decode)", title="safetensors vs full envelope path")
    reasons = sorted(result["refusals_by_reason"].items(), key=lambda kv: -kv[1])
    axes[1].barh([k for k, _ in reasons], [v for _, v in reasons])
    axes[1].set(xscale="log", title=f"{cases:,} mutated envelopes: {result['fuzz_crashes']} crashes")
    fig.tight_layout()
    fig.savefig(RESULTS / "protocol.png", dpi=110)
    print(json.dumps({k: v for k, v in result.items() if k != "crash_examples"}, indent=2))


if __name__ == "__main__":
    main()
