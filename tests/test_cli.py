"""The command line as a user types it."""

import json
import os
import subprocess
import sys

import pytest

from fedloom.cli import main


def fedloom(*args, cwd=None, env_columns=None):
    env = {**os.environ, "COLUMNS": str(env_columns)} if env_columns else None
    return subprocess.run([sys.executable, "-m", "fedloom.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


@pytest.mark.slow
def test_default_run_reaches_90_percent_and_writes_a_run_dir(tmp_path):
    done = fedloom("run", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["central_accuracy"] >= 0.90
    assert summary["rounds_done"] == 50 and "central_accuracy" in done.stdout


def test_bad_config_key_exits_nonzero_naming_the_key(tmp_path):
    done = fedloom("run", "--set", "client.learning_rate=0.1")
    assert done.returncode == 2
    assert "client.learning_rate" in done.stderr and "lr" in done.stderr


def test_impossible_value_names_the_key_and_the_bound():
    done = fedloom("run", "--set", "sampling.clients_per_round=500")
    assert done.returncode == 2 and "clients_per_round = 500" in done.stderr and "n_clients = 100" in done.stderr


def test_missing_data_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.npz"
    done = fedloom("run", "--quiet", "--set", "data.dataset=npz", "--set", f"data.options.path={str(missing)!r}")
    assert done.returncode == 2 and str(missing) in done.stderr.replace("\n", "")


def test_config_file_and_overrides(tmp_path, capsys):
    config = tmp_path / "exp.toml"
    config.write_text('name = "tiny"\nrounds = 2\n[algorithm]\nname = "fedavg"\n')
    code = main(["run", str(config), "--set", "algorithm.name=fedprox", "--set", "rounds=3", "--quiet",
                 "--out", str(tmp_path / "runs")])
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("tiny-")
    resolved = (run_dir / "config.toml").read_text()
    assert 'name = "fedprox"' in resolved and "rounds = 3" in resolved
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_yaml_config_and_missing_config_file(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("rounds: 1\noutput: {progress: false, dir: %s}\n" % (tmp_path / "runs"))
    assert main(["run", str(config)]) == 0
    done = fedloom("run", str(tmp_path / "absent.toml"))
    assert done.returncode == 2 and "absent.toml" in done.stderr


def test_list_names_every_kind_of_building_block():
    done = fedloom("list")
    assert done.returncode == 0
    for word in ("fedavg", "scaffold", "fedyogi", "digits", "mnist5k", "synthetic", "dirichlet", "shards",
                 "pathological", "dirichlet_classwise", "inner_dirichlet", "exponential",
                 "cnn", "mean", "serial", "label_flip", "alie", "resnet20", "transformer", "language_model",
                 "regression", "femnist", "shakespeare", "cifar10"):
        assert word in done.stdout


def test_list_walks_every_registry_and_keeps_brackets():
    from fedloom.cli import registries

    done = fedloom("list", env_columns=400)
    for title, registry in registries().items():
        assert title in done.stdout
        for name, description in registry.describe().items():
            assert name in done.stdout and description in done.stdout, (title, name)
    assert "hidden = [widths]" in done.stdout and "[C, H, W]" in done.stdout  # not eaten as rich markup
    assert {"ring", "exponential_directed", "gradient_tracking", "clipped", "clip", "ray"} <= {
        name for registry in registries().values() for name in registry}


def test_report_redraws_from_metrics(tmp_path):
    assert main(["run", "--quiet", "--set", "rounds=2", "--out", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    (run_dir / "report.html").unlink()
    (run_dir / "accuracy.png").unlink()
    done = fedloom("report", str(run_dir))
    assert done.returncode == 0
    assert (run_dir / "report.html").exists() and (run_dir / "accuracy.png").exists()
    assert fedloom("report", str(tmp_path / "nothing")).returncode == 2


def test_help_lists_the_commands():
    done = fedloom("run", "--help")
    assert done.returncode == 0 and "--set" in done.stdout


def test_list_takes_kinds():
    done = fedloom("list", "algorithms", "models", env_columns=400)
    assert done.returncode == 0, done.stderr
    assert "fedavg" in done.stdout and "resnet20" in done.stdout and "hidden = [widths]" in done.stdout
    assert "dirichlet" not in done.stdout and "krum" not in done.stdout
    aggregators = fedloom("list", "aggregator", env_columns=400).stdout
    assert "weighted mean (FedAvg)" in aggregators and "krum" in aggregators  # mean has a description
    refused = fedloom("list", "algoritms")
    assert refused.returncode == 2 and "algoritms" in refused.stderr and "algorithms" in refused.stderr


def test_summary_table_formats_bytes_given_as_floats():
    from rich.console import Console

    from fedloom.cli import _summary_table

    console = Console(width=200, record=True)
    console.print(_summary_table({"name": "x", "bytes_per_node_total": 76960.0, "bytes_up_total": 615680,
                                  "central_accuracy": 0.69359}))
    text = console.export_text()
    assert "0.08 MB" in text and "0.62 MB" in text and "0.6936" in text and "76960" not in text


def test_subpackages_are_attributes_and_help_does_not_import_torch():
    probe = ("import sys, fedloom\n"
             "assert 'torch' not in sys.modules\n"
             "from fedloom.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "assert 'torch' not in sys.modules, 'fedloom --help imported torch'\n"
             "assert 'fedavg' in fedloom.algorithms.ALGORITHMS and fedloom.data.dirichlet\n"
             "try:\n    fedloom.nothing_here\nexcept AttributeError:\n    print('ok')\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr


def test_version_and_config_print_what_they_say():
    from fedloom import __version__
    from fedloom.cli import DEFAULTS
    from fedloom.config import load_config

    assert fedloom("--version").stdout.strip() == f"fedloom {__version__}"
    done = fedloom("config")
    assert done.returncode == 0 and done.stdout == DEFAULTS.read_text()
    assert "[data]" in done.stdout and "# held out as the global test set" in done.stdout
    import tomllib

    assert load_config(tomllib.loads(done.stdout)).to_dict() == load_config().to_dict()


def test_log_level_sets_fedloom_loggers_only():
    probe = ("import logging, sys\nfrom fedloom.cli import main\n"
             "main(sys.argv[1:])\n"
             "logging.getLogger('fedloom.x').debug('fedloom debug')\n"
             "logging.getLogger('fedloom.x').info('fedloom info')\n"
             "logging.getLogger('other').info('other info')\n")
    said = {args: subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                                 timeout=120).stderr
            for args in [("--log-level", "debug", "config"), ("-v", "config"), ("-vv", "config"), ("config",),
                         ("config", "-v")]}
    assert "fedloom debug" in said["--log-level", "debug", "config"]
    assert "other info" not in said["--log-level", "debug", "config"]
    assert "fedloom info" in said["-v", "config"] and "fedloom debug" not in said["-v", "config"]
    assert "fedloom debug" in said["-vv", "config"] and "fedloom info" not in said["config",]
    assert "fedloom info" in said["config", "-v"]  # after the command too


BLOCK_GRPC = """import sys
class NoGrpc:  # as if fedloom were installed without its [deploy] extra
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] == 'grpc' or name.startswith('google.protobuf'):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, NoGrpc())
from fedloom.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.startswith(('grpc', 'google.protobuf'))]
sys.exit(code)
"""


def test_simulations_run_without_grpc_and_the_server_names_the_extra(tmp_path):
    without = lambda *args: subprocess.run([sys.executable, "-c", BLOCK_GRPC, *args],  # noqa: E731
                                           capture_output=True, text=True, timeout=300)
    done = without("run", "--quiet", "--set", "rounds=1", "--set", "model.name=logistic", "--set", "client.epochs=1",
                   "--set", "mode=decentralized", "--set", "data.n_clients=8", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    served = without("server", "--tokens", str(tmp_path / "tokens.txt"))
    assert served.returncode == 2 and "pip install 'fedloom[deploy]'" in served.stderr, served.stderr


def test_a_federated_run_loads_neither_the_graph_libraries_nor_ray_grpc_or_pandas():
    # start-up: networkx and scipy come with decentralized runs (and merging), Ray, gRPC and pandas on demand
    code = ("import sys, fedloom\n"
            "fedloom.run(None, ['rounds=1', 'client.epochs=1', 'model.name=logistic', 'output.save=false',"
            " 'output.progress=false'])\n"
            "print(sorted(m for m in ('networkx', 'scipy', 'ray', 'grpc', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
