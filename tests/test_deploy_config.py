"""The [deploy] config section: its validation, and `fedloom server` flags overriding it."""

from __future__ import annotations

import argparse
import re

import pytest

from fedloom.config import ConfigError, load_config
from fedloom.deploy.cli import add_commands, deploy_overrides, main


def server_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["server", "--tokens", "t.txt", *argv])


def test_deploy_defaults_and_values_from_the_config():
    assert load_config().deploy.model_dump() == {"min_clients": 1, "round_timeout_s": 300.0, "weighting": "examples",
                                                 "max_examples_per_client": None, "max_update_norm": None}
    cfg = load_config({"deploy": {"min_clients": 3, "round_timeout_s": 2.5}})
    assert (cfg.deploy.min_clients, cfg.deploy.round_timeout_s) == (3, 2.5)
    assert load_config(cfg).deploy == cfg.deploy  # kept in the run directory's resolved config


@pytest.mark.parametrize("deploy, complaint", [
    ({"min_clients": 0}, "deploy.min_clients"),
    ({"round_timeout_s": 0}, "deploy.round_timeout_s"),
    ({"round_timeout": 5}, "unknown key 'deploy.round_timeout'; allowed here: min_clients, round_timeout_s"),
])
def test_bad_deploy_values_are_refused_by_name(deploy, complaint):
    with pytest.raises(ConfigError, match=complaint):
        load_config({"deploy": deploy})


def test_min_clients_above_the_federation_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"deploy\.min_clients = 5 is more than data\.n_clients = 4"):
        load_config({"data": {"n_clients": 4}, "deploy": {"min_clients": 5}})


def test_server_flags_override_the_config_and_absent_flags_leave_it():
    def config():
        return {"deploy": {"min_clients": 2, "round_timeout_s": 30.0}}

    assert load_config(config(), deploy_overrides(server_args())).deploy == load_config(config()).deploy
    flagged = load_config(config(), deploy_overrides(server_args("--min-clients", "4", "--round-timeout", "1.5")))
    assert (flagged.deploy.min_clients, flagged.deploy.round_timeout_s) == (4, 1.5)
    only_timeout = load_config(config(), deploy_overrides(server_args("--round-timeout", "7")))
    assert (only_timeout.deploy.min_clients, only_timeout.deploy.round_timeout_s) == (2, 7.0)


def test_the_server_refuses_a_min_clients_flag_above_the_federation(tmp_path, capsys):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("0 secret0\n1 secret1\n")
    code = main(["server", "--tokens", str(tokens), "--address", "127.0.0.1:0", "--set", "data.n_clients=4",
                 "--min-clients", "5"])
    assert code == 2
    assert "deploy.min_clients = 5 is more than data.n_clients = 4" in capsys.readouterr().err


@pytest.mark.parametrize("setting, complaint", [
    ("compression.downlink=fp16", "no compression.downlink"),
    ("attack.name=signflip", "remove the \\[attack\\] table"),
])
def test_the_server_refuses_simulation_only_settings(tmp_path, capsys, setting, complaint):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("0 secret0\n")
    extra = {"attack": ["--set", "attack.f=1"], "privacy": ["--set", "privacy.noise_multiplier=1.0"]}.get(
        setting.split(".")[0], [])
    code = main(["server", "--tokens", str(tokens), "--address", "127.0.0.1:0", "--set", setting, *extra,
                 "--set", f"output.dir={str(tmp_path)!r}"])
    assert code == 2
    assert re.search(complaint, capsys.readouterr().err)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_client_asked_for_a_device_it_lacks_exits_2_naming_the_flag(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "mine.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    code = main(["client", "--server", "127.0.0.1:1", "--data", str(tmp_path / "mine.npz"), "--client-id", "0",
                 "--token", "t", "--device", "cuda", "--patience", "0.1"])
    assert code == 2
    assert "--device = 'cuda' but CUDA is not available here" in capsys.readouterr().err
