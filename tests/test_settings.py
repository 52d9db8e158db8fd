"""Worker settings: file < environment < flags, and start-up refusals an operator can act on."""

from __future__ import annotations

import pytest

from agent_runtime.config import SettingsError, load_worker_settings
from gateway.cli import main


def test_defaults_run_the_tiny_model_on_loopback():
    """With nothing configured the worker is the local demo: tiny model on 127.0.0.1:8765."""
    s = load_worker_settings()
    assert (s.model, s.host, s.port) == ("tiny", "127.0.0.1", 8765)
    assert s.resolved_slots("cpu") == 8 and s.resolved_slots("cuda") == 32


def test_file_then_environment_then_flags(tmp_path, monkeypatch):
    """An operator's YAML file sets the base, the environment overrides it, flags override both."""
    config = tmp_path / "worker.yaml"
    config.write_text("port: 9000\nslots: 3\nsampling:\n  temp: 0.5\n")
    assert load_worker_settings(config).slots == 3
    monkeypatch.setenv("PERSONAGATE_WORKER_SLOTS", "5")
    s = load_worker_settings(config)
    assert (s.port, s.slots, s.sampling.temp) == (9000, 5, 0.5)
    assert load_worker_settings(config, slots=7).slots == 7


def test_personaplex_without_weights_is_refused():
    """Asking for PersonaPlex without a checkpoint folder fails at start with what to add."""
    with pytest.raises(SettingsError, match="needs weights: the checkpoint folder"):
        load_worker_settings(model="personaplex")


def test_every_problem_in_a_file_is_reported(tmp_path):
    """A settings file with several mistakes lists each one with its field."""
    config = tmp_path / "worker.yaml"
    config.write_text("prot: 9000\nslots: 0\n")
    with pytest.raises(SettingsError) as err:
        load_worker_settings(config)
    assert "prot: Extra inputs are not permitted" in str(err.value)
    assert "slots: Input should be greater than or equal to 1" in str(err.value)


def test_broken_yaml_names_the_file(tmp_path):
    """A YAML syntax error points at the file."""
    config = tmp_path / "worker.yaml"
    config.write_text("port: [9000\n")
    with pytest.raises(SettingsError, match=r"worker\.yaml: not valid YAML"):
        load_worker_settings(config)


def test_the_command_exits_2_with_the_reason(capsys):
    """`personagate worker --model personaplex` without weights exits with status 2 and a message,
    not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--model", "personaplex"])
    assert exit_info.value.code == 2
    assert "needs weights" in capsys.readouterr().err
