"""Operator errors are one line (issue 17): a mistake in the setup is one sentence and exit 2, not a traceback.

Each case runs the real ``fedaigc`` CLI as a subprocess from the repo root and asserts exit 2, exactly
one line on stderr naming the problem, no traceback, and nothing created where nothing should be.
Config mistakes are found before torch loads (the subprocess reports what it imported). Runtime
mistakes meet real components: a closed port, a Mosquitto of our own that refuses anonymous
clients, the shared broker spoken to over TLS, a corrupt store and key, a PostgreSQL port nobody
serves, a metrics port we hold. The type checker's own rules come last, as properties.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.broker import broker_listening, free_port
from aggregator.config import AggregatorConfig, LoraTable
from aggregator.settings import ConfigError, check_value, describe, in_range
from aggregator.state import open_store
from edge_sdk.protocol.identity import Identity

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "peft", "transformers")
# the CLI's own main, then which heavy libraries it had loaded by the time it answered
CLI_REPORTING_IMPORTS = ("import sys; from aggregator.cli import main; code = main(sys.argv[1:]); "
                         f"print(sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(code)")


def fedaigc(*args: str, report_imports: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    command = ["-c", CLI_REPORTING_IMPORTS] if report_imports else ["-m", "aggregator.cli"]
    return subprocess.run([sys.executable, *command, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


def config_error(tmp_path: Path, toml: str) -> str:
    """The one line ``fedaigc aggregator`` answers a config holding ``toml`` with, checked torch-free."""
    path = tmp_path / "aggregator.toml"
    path.write_text(toml)
    result = fedaigc("aggregator", "--config", path, report_imports=True)
    assert result.stdout.strip() == "[]", f"a config error imported {result.stdout}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aggregator.toml"]  # nothing created
    return result.stderr.strip()


def fleet_state(tmp_path: Path) -> Path:
    """A state directory as the daemon leaves it: its key and its store."""
    state = tmp_path / "state"
    state.mkdir()
    Identity.generate().save(state / "aggregator.key")
    open_store(str(state / "state.db")).close()
    return state


def rollout(state: Path, mqtt_url: str) -> subprocess.CompletedProcess:
    return fedaigc("rollout", "--artifact", state, "--to", "all", "--state-dir", state, "--mqtt-url", mqtt_url,
                   "--topic-prefix", f"t-{uuid.uuid4().hex[:8]}")


# ------------------------------------------------------------------ config, before anything heavy
def test_a_missing_config_file_is_named(tmp_path):
    result = fedaigc("aggregator", "--config", tmp_path / "nope.toml", report_imports=True)
    assert_one_line(result, "no config file at", "nope.toml")
    assert result.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []


def test_toml_syntax_gives_line_and_column(tmp_path):
    line = config_error(tmp_path, "[aggregator]\nrounds = 3\nquorum = \n")
    assert "is not valid TOML" in line and "line 3, column 10" in line and len(line.splitlines()) == 1


def test_an_unknown_setting_suggests_the_close_one(tmp_path):
    assert config_error(tmp_path, "[aggregator]\nround = 3\n").endswith(
        "unknown setting 'round' in " f"{tmp_path / 'aggregator.toml'} (did you mean 'rounds'?)")


def test_a_wrong_type_names_the_setting_and_the_value(tmp_path):
    assert config_error(tmp_path, '[aggregator]\nrounds = "ten"\n') == \
        "fedaigc aggregator: rounds must be an integer, got 'ten'"


def test_tokens_given_as_one_string_are_refused(tmp_path):
    assert config_error(tmp_path, '[aggregator]\ntokens = "change-me"\n') == \
        "fedaigc aggregator: tokens must be a list of strings, got 'change-me'"


def test_an_out_of_range_value_gives_the_range(tmp_path):
    assert config_error(tmp_path, "[aggregator]\nquorum = 2\n") == "fedaigc aggregator: quorum must be in (0, 1], got 2"


# ------------------------------------------------------------------ runtime: broker, state, key, port
def test_a_closed_broker_port_is_connection_refused_at_once(tmp_path):
    port = free_port()
    config = tmp_path / "aggregator.toml"
    config.write_text(f'[aggregator]\nmqtt_url = "mqtt://127.0.0.1:{port}"\nstate_dir = "{tmp_path / "state"}"\n')
    result = fedaigc("aggregator", "--config", config)
    assert_one_line(result, f"connection refused at 127.0.0.1:{port}")
    assert "no CONNACK" not in result.stderr  # the refusal is final: no wait for a CONNACK on either protocol


@pytest.fixture()
def closed_broker(tmp_path):
    """A Mosquitto of our own that lets no anonymous client in."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\n")
    process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not broker_listening("127.0.0.1", port, 0.2):
            assert process.poll() is None and time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def test_a_broker_refusing_the_credentials_is_not_authorised(tmp_path, closed_broker):
    assert_one_line(rollout(fleet_state(tmp_path), closed_broker), "cannot connect to the MQTT broker",
                    "not authorised")


def test_tls_to_a_plain_listener_is_a_tls_failure(tmp_path, mqtt_url):
    plain = mqtt_url.replace("mqtt://", "mqtts://")
    assert_one_line(rollout(fleet_state(tmp_path), plain), "cannot connect to the MQTT broker", "TLS")


def test_a_corrupt_state_store_is_named_as_such(tmp_path):
    store = tmp_path / "state.db"
    store.write_bytes(b"this is not SQLite, it is a text file that got in the way\n" * 64)
    assert_one_line(fedaigc("status", "--state", store), f"{store} is not a fedaigc state store",
                    "file is not a database")


def test_a_corrupt_key_stops_the_daemon_before_it_creates_a_store(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "aggregator.key").write_bytes(b"\x00garbage")
    config = tmp_path / "aggregator.toml"
    config.write_text(f'[aggregator]\nstate_dir = "{state}"\nmqtt_topic_prefix = "t-{uuid.uuid4().hex[:8]}"\n')
    assert_one_line(fedaigc("aggregator", "--config", config), "aggregator.key is not a fedaigc key file")
    assert sorted(p.name for p in state.iterdir()) == ["aggregator.key"]
    assert (state / "aggregator.key").read_bytes() == b"\x00garbage"  # never replaced: devices pinned it


def test_a_postgresql_url_nobody_answers_is_one_line():
    url = f"postgresql://127.0.0.1:{free_port()}/fedaigc"
    assert_one_line(fedaigc("status", "--state", url), "cannot connect to PostgreSQL")


def test_a_busy_metrics_port_is_named(tmp_path, mqtt_url):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "aggregator.toml"
        config.write_text(f'[aggregator]\nmqtt_url = "{mqtt_url}"\nstate_dir = "{tmp_path / "state"}"\n'
                          f'mqtt_topic_prefix = "t-{uuid.uuid4().hex[:8]}"\nmetrics_port = {port}\n')
        assert_one_line(fedaigc("aggregator", "--config", config), f"metrics port {port} is in use")


def test_status_on_a_path_with_no_state_says_so_and_creates_nothing(tmp_path):
    missing = tmp_path / "typo" / "state.db"
    result = fedaigc("status", "--state", missing)
    assert_one_line(result, f"no fedaigc state at {missing}")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the type checker, as properties
@given(st.integers())
def test_any_integer_is_an_integer_setting(n):
    assert check_value("rounds", int, n) == n


@given(st.one_of(st.text(), st.booleans(), st.floats(), st.lists(st.integers()), st.none()))
def test_nothing_else_is_an_integer_setting(value):
    with pytest.raises(ConfigError, match=r"^rounds must be an integer, got "):
        check_value("rounds", int, value)


@given(st.one_of(st.integers(min_value=-2**53, max_value=2**53), st.floats(allow_nan=False, allow_infinity=False)))
def test_a_number_setting_takes_integers_and_finite_floats_as_floats(x):
    value = check_value("borrow", float, x)
    assert isinstance(value, float) and value == x


@pytest.mark.parametrize("x", [2**53 + 1, -(2**53 + 1), 10**400])
def test_a_number_setting_refuses_an_integer_no_float_holds_exactly(x):
    with pytest.raises(ConfigError, match=r"^borrow must be a number"):
        check_value("borrow", float, x)


@given(st.sampled_from([float("nan"), float("inf"), True, "1.0"]))
def test_a_number_setting_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(ConfigError, match=r"^borrow must be a number"):
        check_value("borrow", float, value)


@given(st.lists(st.text()))
def test_a_list_of_strings_is_held_as_a_tuple(tokens):
    assert check_value("tokens", tuple[str, ...], tokens) == tuple(tokens)


@given(st.text(min_size=1))
def test_a_string_is_not_a_list_of_strings(token):
    with pytest.raises(ConfigError, match=r"^tokens must be a list of strings, got "):
        check_value("tokens", tuple[str, ...], token)


@given(st.floats(allow_nan=False), st.floats(allow_nan=False, allow_infinity=False),
       st.floats(allow_nan=False, allow_infinity=False))
def test_ranges_are_the_comparisons_they_spell(x, a, b):
    low, high = sorted((round(a, 3), round(b, 3)))
    assert in_range(x, f"({low}, {high}]") == (low < x <= high)
    assert in_range(x, f"[{low}, {high})") == (low <= x < high)
    assert in_range(x, f">= {low}") == (x >= low)
    assert in_range(x, f"> {low}") == (x > low)


def test_an_optional_setting_takes_none_and_its_type():
    assert check_value("k", int | None, None) is None
    assert check_value("k", int | None, 3, ">= 1") == 3
    with pytest.raises(ConfigError, match=r"^k must be >= 1, got 0$"):
        check_value("k", int | None, 0, ">= 1")


def test_every_declared_setting_has_a_checkable_type():
    """Settings added later are checked with no code of their own: each default passes its own check."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(AggregatorConfig, localns={"LoraConfig": LoraTable})
    for f in dataclasses.fields(AggregatorConfig):
        assert describe(hints[f.name])
        check_value(f.name, hints[f.name], f.default, f.metadata.get("within"))


def test_the_constructor_raises_config_error_for_programs():
    with pytest.raises(ConfigError, match=r"^rounds must be an integer, got 'ten'$"):
        AggregatorConfig(rounds="ten")
    with pytest.raises(ConfigError, match=r"^rule must be one of "):
        AggregatorConfig(rule="mean")
