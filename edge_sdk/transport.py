"""A thin MQTT transport over paho-mqtt 2.x (callback API v2).

What it adds to paho, and nothing more: chunking of payloads above the broker's packet
limit (read from the v5 CONNACK when the broker states one), bounded reassembly on the
subscriptions that take chunked messages (``subscribe(..., chunked=True)``: chunk frames
anywhere else are refused as ``wrong_type``; the sender is the device id the topic ends with,
and ``accept_chunks_from`` may refuse it; limits in ``edge_sdk.protocol.chunking``),
per-topic byte counters at the MQTT payload level, re-subscription on reconnect, and a
fallback from MQTT v5 to 3.1.1 for brokers that only speak the older protocol (the
embedded amqtt broker): v5-only extras (message expiry, session expiry, user
properties, shared subscriptions) are then skipped, everything else works the same.

Protocol logic stays out of here: handlers receive ``(topic, payload_bytes)``.
Handlers run on paho's network thread and must be quick; heavy work belongs on a queue.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_sdk.protocol.chunking import DEFAULT_TIMEOUT_S, Reassembler, is_chunk, split_payload, wire_size
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.protocol.topics import DEFAULT_PREFIX, Topics, check_prefix, device_of
from edge_sdk.retry import RetryPolicy

log = logging.getLogger("fedaigc.transport")

Handler = Callable[[str, bytes], None]
DEFAULT_MAX_FRAME = 256 * 1024  # conservative when the broker does not state a limit
NOT_AUTHORISED = (134, 135)  # CONNACK: bad user name or password, not authorized (3.1.1's 4 and 5 map here)


class BrokerUnavailable(ConnectionError):
    """The broker cannot be reached or will not have us (port closed, unknown host, TLS, credentials):
    a setup mistake, reported at once instead of waited out."""


@dataclass(frozen=True)
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = field(default_factory=lambda: f"fedaigc-{uuid.uuid4().hex[:12]}")
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None       # CA bundle; mqtts:// with no CA uses the system store
    keepalive: int = 30
    session_expiry_s: int = 3600    # v5: broker keeps subscriptions and QoS-1 messages this long
    protocol: str = "auto"          # "auto" (v5, falling back to 3.1.1), "5" or "3.1.1"
    max_frame: int | None = None    # chunk above this; None: broker's limit or 256 KiB
    will_topic: str | None = None
    will_payload: bytes = b"offline"
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    max_message_bytes: int = 256 * 1024 * 1024
    max_reassembly_bytes: int | None = None  # all partial chunked messages together; None: 4 x max_message_bytes
    reassembly_timeout_s: float = DEFAULT_TIMEOUT_S  # a partial message with no new chunk this long is dropped
    topic_prefix: str = DEFAULT_PREFIX  # the fleet's topics lie under {topic_prefix}/v1 (edge_sdk.protocol.topics)
    update_retry: RetryPolicy = RetryPolicy()  # re-sending an update the aggregator has not acknowledged (or a table)

    def __post_init__(self) -> None:
        check_prefix(self.topic_prefix)
        object.__setattr__(self, "update_retry", RetryPolicy.of(self.update_retry))
        parsed = urlparse(self.url)
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"MQTT url must start with mqtt:// or mqtts://, got {self.url!r}")
        if not parsed.hostname:
            raise ValueError(f"MQTT url has no host: {self.url!r}")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}")

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (8883 if self.tls else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme in ("mqtts", "ssl") or self.tls_ca is not None

    def credentials(self) -> tuple[str | None, str | None]:
        parsed = urlparse(self.url)
        user = self.username if self.username is not None else (unquote(parsed.username) if parsed.username else None)
        pw = self.password if self.password is not None else (unquote(parsed.password) if parsed.password else None)
        return user, pw


class MqttTransport:
    def __init__(self, config: MqttConfig, refusals: RefusalCounter | None = None,
                 accept_chunks_from: Callable[[str], bool] | None = None) -> None:
        """``accept_chunks_from(sender)``: whether chunks from that device id are reassembled at all (it runs
        on paho's thread at a message's first frame, so it must be quick)."""
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self.refusals = refusals or RefusalCounter()
        self.connected = threading.Event()
        self.bytes_out: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self.protocol: int | None = None
        self.broker_max_packet: int | None = None
        self._handlers: list[tuple[str, Handler, int, bool]] = []
        self.reassembler = Reassembler(max_message_bytes=config.max_message_bytes, budget=config.max_reassembly_bytes,
                                       timeout_s=config.reassembly_timeout_s, accept=accept_chunks_from,
                                       refusals=self.refusals)
        self._sweeper: threading.Thread | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._closing = False
        self._protocol_refused = threading.Event()
        self._refused: str | None = None  # why the broker's CONNACK refused us, other than the protocol

    # ------------------------------------------------------------ lifecycle
    def connect(self, timeout: float = 10.0) -> "MqttTransport":
        order = {"5": [mqtt.MQTTv5], "3.1.1": [mqtt.MQTTv311], "auto": [mqtt.MQTTv5, mqtt.MQTTv311]}[self.config.protocol]
        last_error = None
        for protocol in order:
            self._protocol_refused.clear()
            self._refused = None
            self._client = self._make_client(protocol)
            self._start(self._client, protocol)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.connected.wait(0.05):
                    self.protocol = protocol
                    return self
                if self._protocol_refused.is_set() or self._refused is not None:
                    break
            self._client.disconnect()
            self._client.loop_stop()
            if self._refused is not None:  # another protocol would be refused the same way
                raise BrokerUnavailable(f"cannot connect to the MQTT broker at {self.config.url}: {self._refused}")
            last_error = f"no CONNACK with MQTT {_name(protocol)}"
        raise BrokerUnavailable(f"cannot connect to the MQTT broker at {self.config.url}: {last_error}")

    def _make_client(self, protocol: int) -> mqtt.Client:
        c = self.config
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=c.client_id,
            protocol=protocol,
            clean_session=False if protocol == mqtt.MQTTv311 else None,
        )
        user, pw = c.credentials()
        if user is not None:
            client.username_pw_set(user, pw)
        if c.tls:
            try:
                client.tls_set_context(tls_context(c))
            except (OSError, ssl.SSLError) as e:
                raise BrokerUnavailable(f"cannot use the CA bundle {c.tls_ca} for {c.url}: {e.strerror or e}") from None
        if c.will_topic:
            client.will_set(c.will_topic, c.will_payload, qos=1, retain=True)
        client.reconnect_delay_set(c.reconnect_min_s, c.reconnect_max_s)
        client.max_queued_messages_set(0)  # unbounded: QoS-1 messages wait out a broker outage
        client.max_inflight_messages_set(64)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _start(self, client: mqtt.Client, protocol: int) -> None:
        kwargs = {}
        if protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.config.session_expiry_s
            kwargs = {"clean_start": False, "properties": props}
        host, port = self.config.host, self.config.port
        try:  # the socket and TLS handshake here, so a refused port fails now, not after the CONNACK wait
            client.connect(host, port, self.config.keepalive, **kwargs)
        except ConnectionRefusedError:
            raise BrokerUnavailable(f"cannot connect to the MQTT broker: connection refused at {host}:{port}") from None
        except socket.gaierror as e:
            raise BrokerUnavailable(f"cannot connect to the MQTT broker: unknown host {host} ({e.strerror})") from None
        except ssl.SSLError as e:
            raise BrokerUnavailable(f"cannot connect to the MQTT broker at {host}:{port}: TLS failed "
                                    f"({getattr(e, 'verify_message', None) or e.reason or e})") from None
        except OSError as e:  # no route, timeout; with TLS also a listener that does not speak it
            during = " in the TLS handshake" if self.config.tls else ""
            raise BrokerUnavailable(f"cannot connect to the MQTT broker at {host}:{port}: {e.strerror or e}{during}") \
                from None
        client.loop_start()

    def close(self) -> None:
        self._closing = True
        self._closed.set()
        if self._sweeper is not None:
            self._sweeper.join()
        if self._client is not None:
            if self.config.will_topic and self.connected.is_set():
                # a clean exit still tells the fleet we are gone (the will only fires on a lost link)
                self._client.publish(self.config.will_topic, self.config.will_payload, qos=1, retain=True).wait_for_publish(2)
            self._client.disconnect()
            self._client.loop_stop()
        self.connected.clear()

    def __enter__(self) -> "MqttTransport":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def v5(self) -> bool:
        return self.protocol == mqtt.MQTTv5

    # ------------------------------------------------------------ callbacks (paho network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # while connect() waits, it raises the refusal itself; afterwards paho's reconnects are logged
            log.log(logging.WARNING if self.protocol else logging.DEBUG, "broker %s refused the connection: %s",
                    self.config.url, reason_code)
            if "protocol" in str(reason_code).lower():
                self._protocol_refused.set()
            elif reason_code.value in NOT_AUTHORISED:
                self._refused = f"not authorised ({reason_code})"
            else:
                self._refused = f"the broker refused the connection ({reason_code})"
            return
        if properties is not None and hasattr(properties, "MaximumPacketSize"):
            self.broker_max_packet = int(properties.MaximumPacketSize)
        with self._lock:
            handlers = list(self._handlers)
        for topic, _, qos, _ in handlers:
            client.subscribe(topic, **self._sub_kwargs(qos))
        self.connected.set()
        log.info("connected to %s (session present: %s)", self.config.url, getattr(flags, "session_present", None))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self._closing:
            return
        if self.protocol:  # while connect() waits, it reports the failure itself
            log.warning("lost the broker at %s (%s); paho reconnects with backoff", self.config.url, reason_code)
        if str(reason_code).lower().startswith("unsupported protocol"):
            self._protocol_refused.set()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        topic, payload = message.topic, bytes(message.payload)
        with self._lock:
            self.bytes_in[topic] += len(payload)
            matching = [(h, chunked) for f, h, _, chunked in self._handlers
                        if mqtt.topic_matches_sub(_strip_share(f), topic)]
        handlers = [h for h, _ in matching]
        if is_chunk(payload):
            handlers = [h for h, chunked in matching if chunked]
            try:
                if not handlers:
                    raise RefusedMessage(Refusal.WRONG_TYPE, "a chunk frame where no chunked message is expected")
                payload = self.reassembler.feed(device_of(topic), payload, topic)
            except RefusedMessage as e:
                self.refusals.record(e, topic)
                return
            if payload is None:
                return
        for handler in handlers:
            try:
                handler(topic, payload)
            except RefusedMessage as e:
                self.refusals.record(e, topic)
            except Exception:  # a handler bug must not kill paho's network thread
                log.exception("handler for %s failed", topic)

    # ------------------------------------------------------------ API
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, chunked: bool = False) -> None:
        """Call ``handler(topic, payload)`` for every message on ``topic_filter``. ``chunked``: the filter's
        messages may be larger than a frame, so chunk frames on it are reassembled rather than refused."""
        if topic_filter.startswith("$share/") and self.protocol not in (None, mqtt.MQTTv5):
            raise RuntimeError("shared subscriptions need MQTT v5; this broker only speaks 3.1.1")
        with self._lock:
            self._handlers.append((topic_filter, handler, qos, chunked))
            if chunked and self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep, name="fedaigc-reassembly", daemon=True)
                self._sweeper.start()
        if self._client is not None and self.connected.is_set():
            self._client.subscribe(topic_filter, **self._sub_kwargs(qos))

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop every handler of ``topic_filter`` (e.g. a fetched file's parts) and tell the broker."""
        with self._lock:
            self._handlers = [h for h in self._handlers if h[0] != topic_filter]
        if self._client is not None and self.connected.is_set():
            self._client.unsubscribe(topic_filter)

    def _sweep(self) -> None:
        """Expire partial messages even when no frame arrives to do it (a flood that just stops)."""
        period = min(5.0, self.config.reassembly_timeout_s / 4)
        while not self._closed.wait(period):
            self.reassembler.expire()

    def _sub_kwargs(self, qos: int) -> dict:
        if self.v5:
            return {"options": SubscribeOptions(qos=qos)}
        return {"qos": qos}

    def max_frame(self) -> int:
        if self.config.max_frame is not None:
            return self.config.max_frame
        if self.broker_max_packet:
            return max(1024, min(DEFAULT_MAX_FRAME, self.broker_max_packet - 1024))
        return DEFAULT_MAX_FRAME

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None) -> list[mqtt.MQTTMessageInfo]:
        """Publish (chunked if needed). QoS-1 messages queue in paho while the broker is away."""
        if self._client is None:
            raise RuntimeError("connect() first")
        frames = split_payload(payload, self.max_frame())
        if retain and len(frames) > 1:
            raise ValueError("a retained message must fit in one frame")
        props = None
        if self.v5 and expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry_s)
        infos = []
        for frame in frames:
            infos.append(self._client.publish(topic, frame, qos=qos, retain=retain, properties=props))
            with self._lock:
                self.bytes_out[topic] += len(frame)
        return infos

    def clear_retained(self, topic: str, timeout: float = 30.0) -> bool:
        """Withdraw the message retained on ``topic``; True once the broker acknowledged it."""
        return self.wait_published(self.publish(topic, b"", retain=True), timeout)

    def wait_published(self, infos: list[mqtt.MQTTMessageInfo], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        for info in infos:
            while not info.is_published():
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
        return True

    def wire_bytes(self, payload_len: int) -> int:
        """MQTT payload bytes a message of this length costs through this connection (chunking included)."""
        return wire_size(payload_len, self.max_frame())

    def byte_totals(self) -> dict[str, int]:
        with self._lock:
            return {"out": sum(self.bytes_out.values()), "in": sum(self.bytes_in.values())}


def discard_session(mqtt_url: str, client_id: str, timeout: float = 5.0) -> None:
    """Make the broker forget a persistent session (and whatever it queued for it): connect with
    clean start and no session expiry, then leave. For clients a test or
    benchmark started on a shared broker, so their queues do not outlive the run."""
    parsed = urlparse(mqtt_url)
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(parsed.hostname or "127.0.0.1", parsed.port or 1883, clean_start=True)
    client.loop_start()
    connected.wait(timeout)
    client.disconnect()
    client.loop_stop()


def tls_context(config: MqttConfig) -> ssl.SSLContext:
    """The broker's certificate checked against ``tls_ca`` (else the system's CAs), its host name included."""
    return ssl.create_default_context(cafile=config.tls_ca)


def _strip_share(topic_filter: str) -> str:
    """``$share/group/a/b`` delivers messages whose topic matches ``a/b``."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def _name(protocol: int) -> str:
    return {mqtt.MQTTv5: "5", mqtt.MQTTv311: "3.1.1"}.get(protocol, str(protocol))
