"""The broker enforces who may say what (issue 17): a real Mosquitto running ``fedaigc broker-config``'s output.

One broker per module on a free port, as a child process: no anonymous clients; devices log in
as their device id and may publish only on their own topics and read only their own downlink
and the broadcasts; only the aggregator account publishes the retained keys and rollout topics.
Mosquitto drops an unauthorised publish without closing the connection; to an MQTT v5 client it
says so in the PUBACK ("Not authorized"), which the tests read. Then the real daemon and devices
federate through it, revocation disconnects, and TLS with a CA made here.
"""

from __future__ import annotations

import subprocess
import threading
import tomllib
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.broker import EmbeddedBroker, free_port
from aggregator.broker_auth import (
    PARTIES,
    acl_text,
    add_broker_user,
    hash_password,
    reload_broker,
    remove_broker_user,
    verify_password,
    write_broker_config,
)
from aggregator.cli import main as cli_main
from aggregator.simulation.lite import LiteDevice
from edge_sdk.protocol.provisioning import DeviceCredentials
from edge_sdk.protocol.topics import LAYOUT, Topics, TopicSpec
from edge_sdk.transport import MqttConfig, MqttTransport
from tests.polling import wait_until
from tests.test_service import make_service, small_delta

PASSWORDS = {"devA": "secret-a", "devB": "secret-b"}


class Client:
    """A raw MQTT v5 client that records what the broker answers: CONNACK, PUBACK and SUBACK reason codes."""

    def __init__(self, url: str, user: str | None, password: str | None, tls_ca: str | None = None) -> None:
        config = MqttConfig(url=url)
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"raw-{user}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=tls_ca)
        self.connack: str | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, str] = {}
        self._event = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self._note(self.messages.append, (m.topic, bytes(m.payload)))
        self.client.on_publish = lambda c, u, mid, rc, p: self._note(self.pubacks.__setitem__, mid,
                                                                             str(rc) if rc.is_failure else "accepted")
        self.client.connect(config.host, config.port)
        self.client.loop_start()
        with self._event:
            self._event.wait_for(lambda: self.connack is not None, 5)

    def _note(self, fn, *args) -> None:
        with self._event:
            fn(*args)
            self._event.notify_all()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._note(setattr, self, "connack", str(reason_code))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        """The broker's PUBACK for a QoS-1 publish: "accepted" (also "no matching subscribers") or its refusal."""
        mid = self.client.publish(topic, payload, qos=1, retain=retain).mid
        with self._event:
            self._event.wait_for(lambda: mid in self.pubacks, 5)
        return self.pubacks[mid]

    def subscribe(self, topic_filter: str) -> None:
        self.client.subscribe(topic_filter, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(url: str, user: str, password: str, topic: str) -> bytes | None:
    """What a new subscriber gets retained on ``topic`` (None: nothing)."""
    c = Client(url, user, password)
    try:
        c.subscribe(topic)
        try:
            wait_until(lambda: c.messages, 1.0, "a retained message")
        except TimeoutError:
            return None
        return c.messages[0][1]
    finally:
        c.close()


class SecuredBroker:
    """A Mosquitto on a free port with a generated config, devA and devB provisioned."""

    def __init__(self, out: Path, **options) -> None:
        self.prefix = f"acl{uuid.uuid4().hex[:8]}"
        self.topics = Topics(self.prefix)
        self.port = free_port()
        self.files = write_broker_config(out / "broker", self.prefix, port=self.port, bind="127.0.0.1", **options)
        self.aggregator = tomllib.loads(self.files.aggregator_toml.read_text())["aggregator"]
        for user, password in PASSWORDS.items():
            add_broker_user(self.files.passwd, user, password)
        self.broker = EmbeddedBroker("127.0.0.1", self.port, config=self.files.conf, state_dir=out / "run",
                                     tls="tls_cert" in options).start()
        self.url = self.broker.url

    def client(self, user: str | None, password: str | None = None) -> Client:
        if user == "aggregator":
            password = self.aggregator["mqtt_password"]
        return Client(self.url, user, PASSWORDS.get(user, password))

    def connack(self, user: str | None, password: str | None = None) -> str | None:
        c = self.client(user, password)
        c.close()
        return c.connack

    def url_for(self, user: str) -> str:
        return self.url.replace("://", f"://{user}:{PASSWORDS[user]}@")

    def close(self) -> None:
        self.broker.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    broker = SecuredBroker(tmp_path_factory.mktemp("acl"))
    yield broker
    broker.close()


# ---------------------------------------------------------------- accounts
def test_an_anonymous_client_cannot_connect(secured):
    assert secured.connack(None) == "Not authorized"


def test_a_wrong_password_cannot_connect(secured):
    assert secured.connack("devA-typo", "secret-a") == "Not authorized"
    assert secured.connack("devC", "never provisioned") == "Not authorized"


def test_a_password_hashed_in_python_is_one_mosquitto_passwd_accepts_and_vice_versa(tmp_path):
    ours = hash_password("s3cret")
    assert verify_password(ours, "s3cret") and not verify_password(ours, "s3cret!")
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "theirs", "s3cret"], check=True)
    entry = passwd.read_text().strip().split(":", 1)[1]
    assert entry.startswith("$7$") and verify_password(entry, "s3cret") and not verify_password(entry, "other")


def test_the_generated_files_are_private(secured):
    for path in (secured.files.conf, secured.files.acl, secured.files.passwd, secured.files.aggregator_toml):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_a_removed_account_is_disconnected_when_the_broker_reloads(secured):
    add_broker_user(secured.files.passwd, "devC", "secret-c")
    reload_broker(secured.broker.process.pid)
    wait_until(lambda: secured.connack("devC", "secret-c") == "Success", 5, "devC admitted after the reload")
    c = secured.client("devC", "secret-c")
    assert c.client.is_connected()
    remove_broker_user(secured.files.passwd, "devC")
    reload_broker(secured.broker.process.pid)
    wait_until(lambda: not c.client.is_connected(), 5, "devC disconnected")
    assert secured.connack("devC", "secret-c") == "Not authorized"
    c.close()


# ---------------------------------------------------------------- the ACL
@pytest.mark.parametrize("payload", [b"forged", b""], ids=["overwrite", "clear"])
@pytest.mark.parametrize("topic", ["keys", "manifest", "artifact"])
def test_a_device_cannot_publish_the_retained_keys_or_rollout_topics(secured, topic, payload):
    name = {"keys": secured.topics.aggregator_keys, "manifest": secured.topics.rollout_manifest("all"),
            "artifact": secured.topics.rollout_artifact_part("ab" * 32, 0)}[topic]
    agg = secured.client("aggregator")
    assert agg.publish(name, b"the aggregator's", retain=True) == "accepted"
    device = secured.client("devA")
    assert device.publish(name, payload, retain=True) == "Not authorized"
    assert retained(secured.url, "devB", PASSWORDS["devB"], name) == b"the aggregator's"
    agg.close()
    device.close()


@pytest.mark.parametrize("topic", ["enrol", "task", "update", "generate", "device_status", "status",
                                   "rollout_report"])
def test_device_a_cannot_publish_on_device_bs_topics(secured, topic):
    of = getattr(secured.topics, topic)
    agg = secured.client("aggregator")
    agg.subscribe(of("+"))
    a = secured.client("devA")
    assert a.publish(of("devB"), b"as B") == "Not authorized"
    assert a.publish(of("devA"), b"as A") == "accepted"  # its own: the aggregator hears it
    wait_until(lambda: agg.messages, 5, "the aggregator hearing devA")
    assert agg.messages == [(of("devA"), b"as A")]
    agg.close()
    a.close()


def test_device_a_cannot_read_device_bs_downlink(secured):
    a, b = secured.client("devA"), secured.client("devB")
    a.subscribe(secured.topics.down("devB"))
    a.subscribe(secured.topics.down("+"))
    b.subscribe(secured.topics.down("devB"))
    agg = secured.client("aggregator")
    wait_until(lambda: agg.publish(secured.topics.down("devB"), b"for B") == "accepted" and b.messages, 5,
               "devB receiving its downlink")
    assert agg.publish(secured.topics.down("devA"), b"for A") == "accepted"
    wait_until(lambda: a.messages, 5, "devA receiving its own downlink")
    assert {p for _, p in a.messages} == {b"for A"}  # B's message never reached A, not even through down/+
    for c in (a, b, agg):
        c.close()


def test_a_device_cannot_publish_as_the_aggregator_on_a_downlink(secured):
    a = secured.client("devA")
    assert a.publish(secured.topics.down("devB"), b"forged ack") == "Not authorized"
    a.close()


def test_every_party_of_the_layout_has_a_broker_account():
    assert {name for spec in LAYOUT for name in (spec.publisher, spec.reader)} <= PARTIES.keys()
    for spec in LAYOUT:
        assert spec.pattern.split("{")[0] in acl_text(Topics("x"), "aggregator", ("edge1",))


def test_a_topic_whose_party_has_no_account_is_an_error(monkeypatch):
    monkeypatch.setattr("aggregator.broker_auth.LAYOUT", LAYOUT + (TopicSpec("new/{device}", "gateway",
                                                                             "aggregator", False, "?"),))
    with pytest.raises(ValueError, match="'gateway' for new/{device}"):
        acl_text(Topics("x"), "aggregator")


def test_an_edge_aggregator_account_speaks_only_on_its_own_cloud_topics(tmp_path):
    broker = SecuredBroker(tmp_path, edges=("edge1", "edge2"))
    try:
        url = tomllib.loads(broker.files.edge_tomls["edge1"].read_text())["aggregator"]["cloud_url"]
        cfg = MqttConfig(url=url)
        edge = Client(broker.url, *cfg.credentials())
        assert edge.publish(broker.topics.cloud_up("edge1"), b"report") == "accepted"
        assert edge.publish(broker.topics.cloud_up("edge2"), b"as edge2") == "Not authorized"
        assert edge.publish(broker.topics.cloud_keys, b"forged") == "Not authorized"
        device = broker.client("devA")
        assert device.publish(broker.topics.cloud_up("devA"), b"a device") == "Not authorized"
        for c in (edge, device):
            c.close()
    finally:
        broker.close()


# ---------------------------------------------------------------- a federation through it
def test_the_daemon_and_devices_enrol_and_finish_a_round_through_the_acls(secured, tmp_path):
    agg = secured.aggregator
    service = make_service(tmp_path, secured.url, mqtt_username=agg["mqtt_username"],
                           mqtt_password=agg["mqtt_password"], mqtt_topic_prefix=secured.prefix,
                           clustering="single")
    devices = [LiteDevice(secured.url_for(d), d, topic_prefix=secured.prefix).start() for d in PASSWORDS]
    try:
        vector = np.random.default_rng(0).normal(size=384)
        for d in devices:
            d.join(vector)
        starts = [d.round_start() for d in devices]
        for d, start in zip(devices, starts):
            d.send(d.topics.update(d.id), d.update_envelope(start, small_delta(service)))
        wait_until(lambda: service.current_round() == 2, 30, "round 1 closed")
        assert sorted(d for d, _ in service.store.assignment().items()) == sorted(PASSWORDS)
        assert service.refusals.counts() == {}
    finally:
        for d in devices:
            d.stop()
        service.stop()


def test_a_device_provisioned_with_a_broker_account_enrols_and_loses_it_when_revoked(secured, tmp_path):
    """The operator's path end to end: ``fedaigc provision --broker-passwd`` gives the device its account in
    the broker's password file and its bundle; after a reload it enrols through the ACLs; ``fedaigc revoke
    --device --broker-passwd`` takes the account away again."""
    agg = secured.aggregator
    service = make_service(tmp_path, secured.url, mqtt_username=agg["mqtt_username"],
                           mqtt_password=agg["mqtt_password"], mqtt_topic_prefix=secured.prefix, tokens=(),
                           expected_devices=1, clustering="single")
    config = tmp_path / "aggregator.toml"
    config.write_text(f'[aggregator]\naggregator_id = "{service.config.aggregator_id}"\nmqtt_url = "{secured.url}"\n'
                      f'mqtt_topic_prefix = "{secured.prefix}"\nstate_dir = "{service.config.state_dir}"\n')
    bundle_file, passwd = tmp_path / "devP.json", str(secured.files.passwd)
    try:
        assert cli_main(["provision", "devP", "--out", str(bundle_file), "--config", str(config),
                         "--broker-passwd", passwd]) == 0
        bundle = DeviceCredentials.load(bundle_file)
        assert (bundle.mqtt_username, bundle.aggregator_fingerprint) == ("devP", service.identity.public.fingerprint)
        reload_broker(secured.broker.process.pid)
        device = LiteDevice.from_bundle(bundle).start()
        try:
            device.join(np.random.default_rng(0).normal(size=384))
            device.round_start()  # enrolled, grouped, round 1 opened: every step through the ACLs
        finally:
            device.stop()
        assert cli_main(["revoke", "--device", "devP", "--config", str(config), "--broker-passwd", passwd]) == 0
        reload_broker(secured.broker.process.pid)
        assert secured.connack("devP", bundle.mqtt_password) == "Not authorized"
    finally:
        service.stop()


# ---------------------------------------------------------------- TLS
def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (certificate, key) made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by ``ca``."""
    cert, key, csr, ext = (directory / n for n in ("server.pem", "server.key", "server.csr", "server.ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "authorityKeyIdentifier=keyid,issuer\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                    "-out", cert, "-days", "1", "-extfile", ext], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    ca = make_ca(root / "ca", "fleet-ca")
    cert, key = make_server_cert(root / "ca", ca)
    broker = SecuredBroker(root, tls_cert=cert, tls_key=key, tls_ca=ca[0])
    broker.ca, broker.other_ca = ca[0], make_ca(root / "other", "other-ca")[0]
    yield broker
    broker.close()


def test_a_client_with_the_fleets_ca_does_a_round_trip_over_tls(tls_broker):
    assert tls_broker.url.startswith("mqtts://")
    config = MqttConfig(url=tls_broker.url_for("devA"), tls_ca=str(tls_broker.ca), topic_prefix=tls_broker.prefix)
    agg = Client(tls_broker.url, "aggregator", tls_broker.aggregator["mqtt_password"], tls_ca=str(tls_broker.ca))
    topic = tls_broker.topics.rollout_report("devA")  # devA may publish here; the aggregator account reads it
    agg.subscribe(topic)
    with MqttTransport(config) as device:
        wait_until(lambda: device.wait_published(device.publish(topic, b"over tls")) and agg.messages, 5,
                   "the message through the TLS listener")
    agg.close()
    assert agg.messages[0] == (topic, b"over tls")


@pytest.mark.parametrize("ca", ["none", "other"])
def test_a_client_without_the_fleets_ca_is_refused_with_a_clear_error(tls_broker, ca):
    config = MqttConfig(url=tls_broker.url_for("devA"), tls_ca=None if ca == "none" else str(tls_broker.other_ca))
    with pytest.raises(ConnectionError, match="TLS failed .*certificate"):
        MqttTransport(config).connect(timeout=5)


def test_the_aggregator_config_written_for_tls_names_the_url_and_ca(tls_broker):
    assert tls_broker.aggregator["mqtt_url"] == f"mqtts://127.0.0.1:{tls_broker.port}"
    assert tls_broker.aggregator["mqtt_tls_ca"] == str(tls_broker.ca.resolve())
