"""The wire contract between devices and aggregators: what crosses the broker, and how it is judged.

Envelopes and their signatures (``envelope``), message bodies (``messages``), the topic
layout (``topics``), key material (``identity``), tensors and update codecs on the wire
(``tensors``, ``codecs``), chunking (``chunking``), rollout messages (``rollout``), typed
refusals (``errors``), content digests (``digest``) and crash-safe files (``files``).

Both sides import this package; it imports no device runtime (client, session, training)
and no aggregator code, which ``lint-imports`` checks (``pyproject.toml``).
"""
