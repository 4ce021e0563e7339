"""The fedloom command line: run, list, config, report (and server, client: fedloom.deploy.cli)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedloom import __version__


class _Stdout(Console):
    def on_broken_pipe(self) -> None:
        # rich exits with 1 here; the run's own exit code (130 after Ctrl-C through `| tee`) is the one to keep
        from fedloom.progress import silence_stdout

        self.quiet = True
        silence_stdout()


console = _Stdout()
err_console = Console(stderr=True)


def _run(args: argparse.Namespace) -> int:
    from fedloom.config import ConfigError
    from fedloom.runner import RunFailed, run

    overrides = list(args.set or [])
    if args.quiet:
        overrides.append("output.progress=false")
    if args.progress_every:
        overrides.append(f"output.progress_every={args.progress_every}")
    if args.resume and (args.config or args.out):
        raise ConfigError("--resume continues the run directory's own config: give no config file and no --out")
    if args.out:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a file; give a directory (it is made if missing)")
        overrides.append(f"output.dir={args.out!r}")
    try:
        result = run(args.config, overrides, resume=args.resume)
    except RunFailed as failed:
        console.print(_summary_table(failed.result.summary))
        _print_error("failed", failed)
        return 1
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
        if key.startswith("bytes"):  # before floats: bytes_per_node_total is one
            value = f"{value / 1e6:.2f} MB"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        table.add_row(key, str(value))
    return table


def registries() -> dict[str, "Registry"]:  # noqa: F821
    """Every registry of named parts, by the title ``fedloom list`` gives it."""
    from fedloom.aggregation import AGGREGATORS
    from fedloom.algorithms import ALGORITHMS
    from fedloom.algorithms.gossip import DECENTRALIZED, GOSSIP_RULES
    from fedloom.attacks import ATTACKS, DATA_ATTACKS
    from fedloom.builders import ENGINES
    from fedloom.compression import COMPRESSORS, FEEDBACK
    from fedloom.data import DATASETS, PARTITIONERS
    from fedloom.models import MODELS
    from fedloom.pipeline.transforms import TRANSFORMS
    from fedloom.tasks import TASKS
    from fedloom.topology import TOPOLOGIES

    return {"algorithms (algorithm.name)": ALGORITHMS, "datasets (data.dataset)": DATASETS,
            "partitioners (partition.name)": PARTITIONERS, "models (model.name)": MODELS, "tasks (task.name)": TASKS,
            "aggregators (server.aggregator.name)": AGGREGATORS, "server transforms (server.transforms)": TRANSFORMS,
            "attacks on updates (attack.name)": ATTACKS, "data attacks (attack.name)": DATA_ATTACKS,
            "compressors (compression.name)": COMPRESSORS, "error feedback (compression.feedback)": FEEDBACK,
            "topologies (topology.name)": TOPOLOGIES,
            "decentralized algorithms (decentralized.algorithm)": DECENTRALIZED,
            "gossip rules (decentralized.gossip)": GOSSIP_RULES, "engines (engine.name)": ENGINES}


def _matches(kind: str, title: str) -> bool:
    """``kind`` names the registry titled ``title``: a word of the title, singular or plural
    ("algorithms", "aggregator", "topology"), or the config table it is set in ("attack", "server")."""
    kind = kind.lower()
    words, _, key = title.rstrip(")").partition(" (")
    forms = {kind, kind + "s", kind[:-1] + "ies" if kind.endswith("y") else kind}
    return bool(forms & set(words.split())) or key.split(".")[0] == kind


_KINDS = ("algorithms", "datasets", "partitioners", "models", "tasks", "aggregators", "transforms", "attacks",
          "compressors", "feedback", "topologies", "gossip", "engines")


def _list(args: argparse.Namespace) -> int:
    chosen = registries()
    if args.kinds:
        unknown = [k for k in args.kinds if not any(_matches(k, title) for title in chosen)]
        if unknown:
            _print_error("error", f"no registry {unknown[0]!r}; the kinds: {', '.join(_KINDS)}")
            return 2
        chosen = {t: r for t, r in chosen.items() if any(_matches(k, t) for k in args.kinds)}
    for title, registry in chosen.items():
        table = Table(title=title, show_header=False, title_justify="left")
        for name, line in registry.describe().items():
            table.add_row(Text(name), Text(line))  # Text: brackets in a description are not rich markup
        console.print(table)
    return 0


DEFAULTS = Path(__file__).with_name("defaults.toml")  # the README's Config block; a test keeps them equal
LOG_LEVELS = ("debug", "info", "warning", "error")


def _config(args: argparse.Namespace) -> int:
    sys.stdout.write(DEFAULTS.read_text())  # not console.print: [data] is a TOML table, not rich markup
    return 0


def _log_level(args: argparse.Namespace) -> str | None:
    """--log-level, or -v (info) / -vv (debug); None: leave logging as the command sets it."""
    verbose = getattr(args, "verbose", 0) or 0
    return getattr(args, "log_level", None) or (None if not verbose else "info" if verbose == 1 else "debug")


def _setup_logging(level: str | None) -> None:
    if level is None:
        return
    import logging

    from fedloom.deploy.cli import LOG_FORMAT

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("fedloom").setLevel(level.upper())  # fedloom's loggers only, not every library's


def _add_log_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default,
                        help="level of fedloom's log messages on stderr (default: warning; server, client: info)")
    parser.add_argument("-v", "--verbose", action="count", default=default, help="-v: info, -vv: debug")


def _report(args: argparse.Namespace) -> int:
    from fedloom.tracking import render_report

    html = render_report(Path(args.run_dir))
    console.print(f"report written: {html}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedloom", description="Federated and decentralized learning with PyTorch.")
    parser.add_argument("--version", action="version", version=f"fedloom {__version__}")
    _add_log_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment (default: FedAvg on the bundled digits data)",
                              description="Run an experiment from a TOML/YAML config (or the defaults).")
    run.add_argument("config", nargs="?", help="experiment config, .toml or .yaml (default: built-in defaults)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set algorithm.name=fedprox --set rounds=50")
    run.add_argument("--out", help="directory that receives the run directory (default: runs)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--progress-every", type=int, metavar="N",
                     help="stdout not a terminal: a progress line every N rounds (default: a tenth of the rounds)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted or killed run from its checkpoint")
    run.set_defaults(func=_run)

    lister = commands.add_parser("list", help="list algorithms, datasets, partitioners, models, aggregators, engines",
                                 description="List the registries of named parts, or only those of the kinds given.")
    lister.add_argument("kinds", nargs="*", metavar="KIND", help=f"e.g. algorithms models ({', '.join(_KINDS)})")
    lister.set_defaults(func=_list)

    config = commands.add_parser("config", help="print every config key with its default and what it does",
                                 description="Print the default config as a commented TOML file to start from.")
    config.set_defaults(func=_config)

    report = commands.add_parser("report", help="render the plots and report.html of a run directory again")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)

    from fedloom.deploy.cli import add_commands

    add_commands(commands)
    for command in commands.choices.values():  # `fedloom run -v` as well as `fedloom -v run`
        _add_log_options(command, default=argparse.SUPPRESS)  # SUPPRESS: a sub-command does not undo it
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(_log_level(args))
    from fedloom.config import ConfigError
    from fedloom.registry import OptionError
    from fedloom.data import DataError
    from fedloom.runner import RunDirError

    try:
        return args.func(args)
    except (ConfigError, DataError, OptionError, FileNotFoundError) as err:
        _print_error("error", err)
        return 2
    except RunDirError as err:
        _print_error("error", err.strerror)
        return 1
    except OSError as err:  # the output directory cannot be written, a file cannot be read
        _print_error("error", f"{err.filename or 'a file'}: {err.strerror or err}")
        return 2


def _print_error(label: str, message: object) -> None:
    """One line, the message as plain text (a config key in brackets is not rich markup)."""
    err_console.print(Text.assemble((f"{label}: ", "bold red"), str(message)), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
