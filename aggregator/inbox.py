"""One worker thread runs every protocol handler; paho's network thread only enqueues.

Routes are one table, topic filter to handler, each filter subscribed on the transport with
its own callback (paho's ``message_callback_add`` per filter), so no handler looks at
another's topics. Work from other threads (a mix from the cloud link) is ``post``ed as a
job. Handlers run one at a time, so state changes are serial and every handler can be
idempotent by construction; a refusal is counted and logged, never raised, and a state store
that cannot be written refuses the message as ``unavailable``.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable

from aggregator.state import StateUnavailable
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.transport import MqttTransport

log = logging.getLogger("fedaigc.aggregator")

Handler = Callable[[str, bytes], None]


class Inbox:
    def __init__(self, refusals: RefusalCounter) -> None:
        self.refusals = refusals
        self.routes: dict[str, Handler] = {}
        self._queue: queue.Queue[tuple[Handler, str, bytes]] = queue.Queue()

    def route(self, transport: MqttTransport, topic_filter: str, handler: Handler, chunked: bool = False) -> None:
        """Queue every message matching ``topic_filter`` for ``handler`` (subscribes at QoS 1; ``chunked``:
        its messages may come in chunks, reassembled by the transport)."""
        if topic_filter in self.routes:
            raise ValueError(f"{topic_filter} is routed already")
        self.routes[topic_filter] = handler
        transport.subscribe(topic_filter, lambda topic, payload: self._queue.put((handler, topic, payload)),
                            chunked=chunked)

    def post(self, job: Callable[[], None], context: str) -> None:
        """Run ``job`` on the worker thread, refusals counted against ``context``."""
        self._queue.put((lambda _topic, _payload: job(), context, b""))

    def run_one(self, timeout: float) -> bool:
        """Handle the next message or job, if one arrives within ``timeout`` seconds."""
        try:
            handler, topic, payload = self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        try:
            handler(topic, payload)
        except RefusedMessage as e:
            self.refusals.record(e, topic)
        except StateUnavailable as e:
            self.refusals.record(RefusedMessage(Refusal.UNAVAILABLE, str(e)), topic)
        except Exception:
            log.exception("unexpected error handling %s", topic)
        return True
