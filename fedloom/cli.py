"""The fedloom command line: run, list, report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def _run(args: argparse.Namespace) -> int:
    from fedloom.experiment import run

    from fedloom.config import ConfigError

    overrides = list(args.set or [])
    if args.quiet:
        overrides.append("output.progress=false")
    if args.out:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a file; give a directory (it is made if missing)")
        overrides.append(f"output.dir={args.out!r}")
    result = run(args.config, overrides)
    console.print(_summary_table(result.summary))
    if result.summary["status"] == "interrupted":
        err_console.print(f"interrupted after round {result.summary['rounds_done']}; "
                          f"everything so far is in {result.run_dir}")
        return 130
    return 0


def _summary_table(summary: dict) -> Table:
    table = Table(title=f"fedloom run: {summary['name']}", show_header=False)
    for key, value in summary.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif key.startswith("bytes"):
            value = f"{value / 1e6:.2f} MB"
        table.add_row(key, str(value))
    return table


def _list(args: argparse.Namespace) -> int:
    from fedloom.aggregation.base import AGGREGATORS
    from fedloom.algorithms import ALGORITHMS
    from fedloom.attacks import ATTACKS, DATA_ATTACKS
    from fedloom.compression import COMPRESSORS, FEEDBACK
    from fedloom.data import DATASETS, PARTITIONERS
    from fedloom.models import MODELS

    sections = {
        "algorithms": {k: v.description for k, v in ALGORITHMS.items()},
        "datasets": {k: v[1] for k, v in DATASETS.items()},
        "partitioners": {k: v[1] for k, v in PARTITIONERS.items()},
        "models": {k: v[1] for k, v in MODELS.items()},
        "aggregators": {k: (f.__doc__ or "").strip().splitlines()[0] if f.__doc__ else "" for k, f in
                        AGGREGATORS.items()},
        "attacks": {**{k: v[1] for k, v in ATTACKS.items()}, **DATA_ATTACKS},
        "compressors": {k: v[1] for k, v in COMPRESSORS.items()},
        "error feedback": {k: v[1] for k, v in FEEDBACK.items()},
        "engines": {"auto": "vectorized when the model allows it (not conv nets), else serial (the default)",
                    "vectorized": "all sampled clients in one batched torch.func call",
                    "serial": "one client after another, any nn.Module (the reference)",
                    "ray": "clients on Ray actors (engine.ray_address, engine.ray_workers); pip install fedloom[ray]"},
    }
    for title, entries in sections.items():
        table = Table(title=title, show_header=False, title_justify="left")
        for name, line in entries.items():
            table.add_row(name, line)
        console.print(table)
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedloom.tracking import render_report

    html = render_report(Path(args.run_dir))
    console.print(f"report written: {html}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedloom", description="Federated and decentralized learning with PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment (default: FedAvg on the bundled digits data)",
                              description="Run an experiment from a TOML/YAML config (or the defaults).")
    run.add_argument("config", nargs="?", help="experiment config, .toml or .yaml (default: built-in defaults)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set algorithm.name=fedprox --set rounds=50")
    run.add_argument("--out", help="directory that receives the run directory (default: runs)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    lister = commands.add_parser("list", help="list algorithms, datasets, partitioners, models, aggregators, engines")
    lister.set_defaults(func=_list)

    report = commands.add_parser("report", help="render the plots and report.html of a run directory again")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)

    from fedloom.deploy.cli import add_commands

    add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedloom.config import ConfigError
    from fedloom.core.options import OptionError
    from fedloom.data import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, OptionError) as err:
        return _error(str(err))
    except OSError as err:  # the output directory cannot be written, a file cannot be read
        return _error(f"{err.filename or 'a file'}: {err.strerror or err}")


def _error(message: str) -> int:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
