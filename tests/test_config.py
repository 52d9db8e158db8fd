"""Worker settings: defaults, a YAML file < the environment < explicit overrides, and start-up refusals
an operator can act on."""

from __future__ import annotations

import pytest

from agent_runtime.config import SessionSampling, SettingsError, WorkerSettings, load_worker_settings
from personagate.cli import main


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """No PERSONAGATE_WORKER_* variable of the machine running the tests leaks into them."""
    import os

    for name in list(os.environ):
        if name.startswith("PERSONAGATE_WORKER_"):
            monkeypatch.delenv(name)


def _yaml(tmp_path, text: str):
    path = tmp_path / "worker.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_tiny_model_on_loopback():
    """With nothing configured, the worker is the local demo: the tiny model on 127.0.0.1:8765,
    sampled like PersonaPlex's server, slots chosen by device."""
    s = load_worker_settings()
    assert (s.model, s.host, s.port, s.weights) == ("tiny", "127.0.0.1", 8765, None)
    assert s.slots is None and s.resolved_slots("cpu") == 8 and s.resolved_slots("cuda:0") == 32
    assert s.sampling.session_defaults() == SessionSampling(
        temperature=0.8, top_k=250, text_temperature=0.7, text_top_k=25)
    assert s.sampling.lm_gen_kwargs() == {
        "use_sampling": True, "temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25,
    }


def test_the_environment_sets_values(monkeypatch):
    """PERSONAGATE_WORKER_SLOTS=4 sets the slot count; nested settings use a double underscore."""
    monkeypatch.setenv("PERSONAGATE_WORKER_SLOTS", "4")
    monkeypatch.setenv("PERSONAGATE_WORKER_SAMPLING__GREEDY", "true")
    s = load_worker_settings()
    assert s.slots == 4 and s.resolved_slots("cuda") == 4
    assert s.sampling.greedy and s.sampling.lm_gen_kwargs()["use_sampling"] is False


def test_file_then_environment_then_overrides(tmp_path, monkeypatch):
    """The YAML file sets the base, the environment beats the file, explicit overrides (command-line
    flags) beat both; settings nobody overrides keep the file's value."""
    config = _yaml(tmp_path, "host: 0.0.0.0\nport: 9000\nslots: 3\nsampling:\n  temperature: 0.5\n")
    s = load_worker_settings(config)
    assert (s.host, s.port, s.slots, s.sampling.temperature) == ("0.0.0.0", 9000, 3, 0.5)
    monkeypatch.setenv("PERSONAGATE_WORKER_SLOTS", "5")
    monkeypatch.setenv("PERSONAGATE_WORKER_PORT", "9100")
    s = load_worker_settings(config)
    assert (s.host, s.port, s.slots, s.sampling.temperature) == ("0.0.0.0", 9100, 5, 0.5)
    s = load_worker_settings(config, slots=7, port=None, sampling={"greedy": True})
    assert (s.host, s.port, s.slots) == ("0.0.0.0", 9100, 7)
    # --greedy adds to the file's sampling settings instead of replacing them
    assert s.sampling.greedy and s.sampling.temperature == 0.5


def test_a_personaplex_file_with_its_weights_loads(tmp_path):
    """A file naming the PersonaPlex model and its checkpoint folder is a valid configuration."""
    s = load_worker_settings(_yaml(tmp_path, f"model: personaplex\nweights: {tmp_path}\ndevice: cuda:1\n"))
    assert (s.model, s.weights, s.device) == ("personaplex", tmp_path, "cuda:1")
    assert s.resolved_slots("cpu") == 1


def test_personaplex_without_weights_is_refused():
    """`model: personaplex` without a checkpoint folder fails at start and says what to add."""
    with pytest.raises(SettingsError) as err:
        load_worker_settings(model="personaplex")
    assert "weights" in str(err.value) and "--weights" in str(err.value)


def test_an_unknown_key_in_the_file_is_named(tmp_path):
    """A misspelt setting is refused with its name rather than silently ignored."""
    with pytest.raises(SettingsError) as err:
        load_worker_settings(_yaml(tmp_path, "prot: 9000\n"))
    assert "prot" in str(err.value)


def test_an_unknown_nested_key_in_the_file_is_named(tmp_path):
    """A misspelt sampling setting (`tmep`) is refused with its path rather than silently ignored,
    which would leave the default temperature in production."""
    with pytest.raises(SettingsError) as err:
        load_worker_settings(_yaml(tmp_path, "sampling:\n  tmep: 0.5\n"))
    assert "sampling.tmep" in str(err.value)


def test_sampling_settings_use_the_session_names(tmp_path):
    """The worker's sampling defaults have the names sessions use (temperature, top_k,
    text_temperature, text_top_k); a file still using the old names (temp, temp_text, top_k_text) is
    refused with each old name rather than silently sampling at the defaults."""
    s = load_worker_settings(_yaml(tmp_path, "sampling:\n  temperature: 0.6\n  top_k: 100\n"
                                             "  text_temperature: 0.5\n  text_top_k: 10\n"))
    assert s.sampling.session_defaults() == SessionSampling(
        temperature=0.6, top_k=100, text_temperature=0.5, text_top_k=10)
    with pytest.raises(SettingsError) as err:
        load_worker_settings(_yaml(tmp_path, "sampling:\n  temp: 0.5\n  temp_text: 0.5\n  top_k_text: 5\n"))
    assert all(f"sampling.{old}" in str(err.value) for old in ("temp", "temp_text", "top_k_text"))


def test_every_bad_value_is_listed(tmp_path):
    """Several mistakes in one file are all reported, one line each, with the field."""
    with pytest.raises(SettingsError) as err:
        load_worker_settings(_yaml(tmp_path, "slots: 0\nport: 70000\nsampling:\n  temperature: 5\n"))
    lines = str(err.value).splitlines()
    assert any(line.strip().startswith("slots:") for line in lines)
    assert any(line.strip().startswith("port:") for line in lines)
    assert any(line.strip().startswith("sampling.temperature:") for line in lines)


def test_invalid_yaml_names_the_file(tmp_path):
    """A YAML syntax error points at the file."""
    config = _yaml(tmp_path, "port: [9000\nslots: 2\n")
    with pytest.raises(SettingsError) as err:
        load_worker_settings(config)
    assert str(config) in str(err.value) and "not valid YAML" in str(err.value)


def test_a_file_that_is_not_a_mapping_names_the_file(tmp_path):
    """A YAML list instead of a mapping is refused with the file name."""
    config = _yaml(tmp_path, "- port\n- 9000\n")
    with pytest.raises(SettingsError, match="expected a mapping"):
        load_worker_settings(config)


def test_an_empty_file_means_defaults(tmp_path):
    """An empty settings file (all commented out) is the defaults."""
    assert load_worker_settings(_yaml(tmp_path, "# nothing yet\n")) == WorkerSettings()


def test_a_missing_or_unreadable_file_is_named(tmp_path):
    """A wrong --config path, or a file that is not text, is refused with the path."""
    with pytest.raises(SettingsError, match="no such settings file"):
        load_worker_settings(tmp_path / "nope.yaml")
    binary = tmp_path / "worker.yaml"
    binary.write_bytes(b"\xff\xfe\x00port: 1\x00\x9c")
    with pytest.raises(SettingsError) as err:
        load_worker_settings(binary)
    assert str(binary) in str(err.value)


def test_a_bad_environment_value_is_named(monkeypatch):
    """A malformed environment variable is reported with the setting it feeds."""
    monkeypatch.setenv("PERSONAGATE_WORKER_PORT", "eighty")
    with pytest.raises(SettingsError, match="port:"):
        load_worker_settings()


def test_the_worker_command_exits_2_with_the_reason(capsys, monkeypatch):
    """`personagate worker --model personaplex` without weights exits with status 2 and prints the
    reason on stderr, not a traceback."""
    _never_start_a_server(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--model", "personaplex"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "weights" in captured.err and "personaplex" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def _never_start_a_server(monkeypatch):
    """Make `personagate worker` fail fast instead of serving forever if its settings were accepted."""
    import uvicorn

    import agent_runtime.drain
    import agent_runtime.server

    def refuse(*args, **kwargs):
        raise AssertionError("the worker was started: its settings should have been refused")

    monkeypatch.setattr(agent_runtime.server, "create_app", refuse)
    monkeypatch.setattr(agent_runtime.drain, "serve", refuse)
    monkeypatch.setattr(uvicorn, "run", refuse)


def test_the_worker_command_reports_a_broken_config_file(tmp_path, capsys, monkeypatch):
    """`personagate worker --config FILE` with a broken file exits with status 2 and names the file."""
    _never_start_a_server(monkeypatch)
    config = _yaml(tmp_path, "sampling:\n  tmep: 0.5\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "sampling.tmep" in capsys.readouterr().err


def test_registration_and_drain_defaults():
    """No Redis: no registration. The routing identity defaults to the listen address and HOSTNAME:PORT;
    a drain waits up to an hour (the longest call)."""
    import socket

    s = load_worker_settings(port=9001)
    assert s.redis_url is None and s.redis_prefix == "{pg}"
    assert s.resolved_advertise_url() == "ws://127.0.0.1:9001/v1/sessions"
    assert s.resolved_worker_id() == f"{socket.gethostname()}:9001"
    assert (s.heartbeat_seconds, s.worker_ttl_seconds, s.drain_seconds) == (1.0, 3.0, 3600.0)
    assert load_worker_settings(host="::1").resolved_advertise_url() == "ws://[::1]:8765/v1/sessions"


def test_redis_urls_of_every_kind_are_accepted():
    for url in ("redis://redis:6379/0", "rediss://:pw@redis.example:6380", "unix:///run/redis/redis.sock?db=1",
                "redis+sentinel://s1:26379,s2:26379/mymaster/0"):
        assert load_worker_settings(redis_url=url).redis_url == url


@pytest.mark.parametrize("overrides, message", [
    ({"redis_url": "http://redis:6379"}, "redis_url: .*expected a redis://"),
    ({"redis_url": "redis://"}, "redis_url: .*needs a host"),
    ({"redis_url": "redis://u:secret@redis:sixty"}, r"redis_url: .*bad port in 'redis://u:\*\*\*@redis:sixty'"),
    ({"redis_url": "redis+sentinel://s1/mymaster"}, "redis_url: .*host:port"),
    ({"redis_prefix": "pg"}, "redis_prefix: .*hash tag"),
    ({"advertise_url": "http://10.0.0.7:8765/v1/sessions"}, "advertise_url: .*ws:// or wss://"),
    ({"advertise_url": "ws://0.0.0.0:8765/v1/sessions"}, "advertise_url: .*listen address"),
    ({"worker_id": "gpu\n1"}, "worker_id: .*control characters"),
    ({"heartbeat_seconds": 2.0}, "at least twice heartbeat_seconds"),
    ({"drain_seconds": -1}, "drain_seconds:"),
    ({"redis_url": "redis://redis:6379", "host": "0.0.0.0"}, "advertise_url is needed"),
    ({"redis_url": "redis://redis:6379", "port": 0}, "advertise_url is needed"),
], ids=["scheme", "no-host", "port-redacted", "sentinel", "prefix", "advertise-scheme", "advertise-wildcard",
        "worker-id", "ttl", "drain", "wildcard-host", "port-0"])
def test_bad_registration_settings_are_refused(overrides, message):
    with pytest.raises(SettingsError, match=message) as err:
        load_worker_settings(**overrides)
    assert "secret" not in str(err.value)


def test_listening_on_every_address_with_redis_needs_the_advertised_url():
    s = load_worker_settings(redis_url="redis://redis:6379", host="0.0.0.0",
                             advertise_url="ws://10.0.0.7:8765/v1/sessions")
    assert s.resolved_advertise_url() == "ws://10.0.0.7:8765/v1/sessions"


def test_forwarded_allow_ips_is_validated():
    """The gateway's trusted proxies (tests/test_trusted_proxies.py): a typo is refused at start instead of silently
    trusting nobody (or, with '*', everybody); a CIDR is written the way uvicorn matches it."""
    from gateway.config import GatewaySettings, load_gateway_settings

    assert GatewaySettings().forwarded_allow_ips == ["127.0.0.1"]  # uvicorn's own default
    settings = GatewaySettings(forwarded_allow_ips=["10.0.0.1/8", " fd00::1 ", "192.0.2.4"])
    assert settings.forwarded_allow_ips == ["10.0.0.0/8", "fd00::1", "192.0.2.4"]
    for bad in ("*", "ingress-nginx", "10.0.0.0/33"):
        with pytest.raises(SettingsError, match="forwarded_allow_ips"):
            load_gateway_settings(None, forwarded_allow_ips=[bad])
