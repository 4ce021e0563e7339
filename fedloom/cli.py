"""The fedloom command line: run, list, config, report, compare, sweep, dashboard (and server, client:
fedloom.deploy.cli)."""

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

    overrides = _overrides(args)
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
    if args.dashboard:
        _start_dashboard(args, overrides)
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


def _start_dashboard(args: argparse.Namespace, overrides: list[str]) -> None:
    """``fedloom run --dashboard``: serve the run's output directory from a daemon thread."""
    from fedloom.config import load_config
    from fedloom.dashboard import serve, url

    root = Path(args.resume).parent if args.resume else Path(load_config(args.config, overrides).output.dir)
    thread = serve(root, args.host, args.port, background=True)
    if thread.server.started:
        err_console.print(f"dashboard: {url(args.host, args.port)}", highlight=False)
    else:
        _print_error("dashboard", f"could not serve on {args.host}:{args.port} (taken?); the run goes on without it")


def _dashboard(args: argparse.Namespace) -> int:
    from fedloom.dashboard import serve, url

    if not Path(args.runs_dir).is_dir():
        raise FileNotFoundError(f"no runs directory {args.runs_dir}")
    console.print(f"fedloom dashboard of {args.runs_dir}: {url(args.host, args.port)} (Ctrl-C stops it)",
                  highlight=False)
    serve(Path(args.runs_dir), args.host, args.port)
    return 0


def _add_dashboard_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8050, help="the dashboard's port (default: 8050)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine)")


def _summary_table(summary: dict) -> Table:
    from fedloom.tracking.rundir import PER_CLIENT

    table = Table(title=f"fedloom run: {summary['name']}", show_header=False)
    for key, value in summary.items():
        if value is None or key.startswith(PER_CLIENT):  # per-client values: the report's histogram
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
    from fedloom.algorithms.asynchronous import ASYNC_RULES
    from fedloom.algorithms.gossip import DECENTRALIZED, GOSSIP_RULES
    from fedloom.attacks import ATTACKS, DATA_ATTACKS
    from fedloom.builders import ENGINES
    from fedloom.compression import COMPRESSORS, FEEDBACK
    from fedloom.data import DATASETS, PARTITIONERS
    from fedloom.models import MODELS
    from fedloom.personalization import METHODS
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
            "gossip rules (decentralized.gossip)": GOSSIP_RULES, "engines (engine.name)": ENGINES,
            "personalization methods (personalization.method)": METHODS,
            "asynchronous rules (asynchronous.algorithm)": ASYNC_RULES}


def _matches(kind: str, title: str) -> bool:
    """``kind`` names the registry titled ``title``: a word of the title, singular or plural
    ("algorithms", "aggregator", "topology"), or the config table it is set in ("attack", "server")."""
    kind = kind.lower()
    words, _, key = title.rstrip(")").partition(" (")
    forms = {kind, kind + "s", kind[:-1] + "ies" if kind.endswith("y") else kind}
    return bool(forms & set(words.split())) or key.split(".")[0] == kind


_KINDS = ("algorithms", "datasets", "partitioners", "models", "tasks", "aggregators", "transforms", "attacks",
          "compressors", "feedback", "topologies", "gossip", "engines", "asynchronous")


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
    """The ``fedloom`` command line: its subcommands (run, list, config, compare, sweep, dashboard, ...) and options."""
    parser = argparse.ArgumentParser(prog="fedloom", description="Federated and decentralized learning with PyTorch.")
    parser.add_argument("--version", action="version", version=f"fedloom {__version__}")
    _add_log_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment (default: FedAvg on the bundled digits data)",
                              description="Run an experiment from a TOML/YAML config (or the defaults).")
    run.add_argument("config", nargs="?", help="experiment config, .toml or .yaml (default: built-in defaults)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides as with --set, e.g. rounds=5")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set algorithm.name=fedprox --set rounds=50")
    run.add_argument("--out", help="directory that receives the run directory (default: runs)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--progress-every", type=int, metavar="N",
                     help="stdout not a terminal: a progress line every N rounds (default: a tenth of the rounds)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted or killed run from its checkpoint")
    run.add_argument("--dashboard", action="store_true", help="serve a live dashboard of the output directory")
    _add_dashboard_options(run)
    run.set_defaults(func=_run)

    dashboard = commands.add_parser("dashboard", help="a live web view of the runs in a directory",
                                    description="Serve a web page of the run directories under RUNS_DIR: their "
                                    "status, and the selected run's curves as its rounds are written.")
    dashboard.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR", help="default: runs")
    _add_dashboard_options(dashboard)
    dashboard.set_defaults(func=_dashboard)

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

    _add_research_commands(commands)

    from fedloom.deploy.cli import add_commands

    add_commands(commands)
    for command in commands.choices.values():  # `fedloom run -v` as well as `fedloom -v run`
        _add_log_options(command, default=argparse.SUPPRESS)  # SUPPRESS: a sub-command does not undo it
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status (2: bad input, with a
    message and no traceback)."""
    args = _parse(argv)
    _setup_logging(_log_level(args))
    from fedloom.config import ConfigError
    from fedloom.dashboard import DashboardUnavailable
    from fedloom.registry import OptionError
    from fedloom.data import DataError
    from fedloom.runner import RunDirError

    try:
        return args.func(args)
    except (ConfigError, DataError, OptionError, FileNotFoundError, DashboardUnavailable) as err:
        _print_error("error", err)
        return 2
    except RunDirError as err:
        _print_error("error", err.strerror)
        return 1
    except OSError as err:  # the output directory cannot be written, a file cannot be read
        _print_error("error", f"{err.filename or 'a file'}: {err.strerror or err}")
        return 2


def _overrides(args: argparse.Namespace) -> list[str]:
    """Hydra-style ``key=value`` positionals, then the --set ones; a first positional that is an override
    and not a config file (``fedloom run rounds=5``) joins them."""
    positional = list(args.overrides or [])
    if args.config and "=" in args.config and not Path(args.config).is_file():
        positional.insert(0, args.config)
        args.config = None
    return [*positional, *(args.set or [])]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """parse_args, letting ``key=value`` overrides stand after flags as well (argparse takes one run of
    positionals, so ``run c.toml --quiet rounds=5`` would leave rounds=5 unrecognized)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def _add_research_commands(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser("compare", help="one table and overlaid curves of several runs",
                                  description="Compare run directories (or globs, or directories of runs such as "
                                  "a sweep's): their final metrics in one table, printed and written with their "
                                  "overlaid curves (PNGs) and a self-contained compare.html.")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", help="directory for the table, plots and page (default: compare-<timestamp>)")
    compare.set_defaults(func=_compare)

    sweep = commands.add_parser("sweep", help="every combination of a grid and seeds, as separate runs",
                                description="Run the grid's product times the seeds, --jobs at a time (as Ray "
                                "tasks when the config sets engine.ray_address), each in its own directory under "
                                "--out; rerunning skips completed runs and continues the rest. Ends with "
                                "summary.csv, summary.md (mean and std over seeds per grid point) and a plot.")
    sweep.add_argument("config", nargs="?", help="experiment config, .toml or .yaml (default: built-in defaults)")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of every run, as with --set")
    sweep.add_argument("--grid", action="append", metavar="KEY=V1,V2,...", default=[],
                       help="a grid axis, e.g. --grid algorithm.name=fedavg,fedprox --grid client.lr=0.05,0.1")
    sweep.add_argument("--seeds", metavar="S1,S2,...", help="seeds of every grid point (default: the config's)")
    sweep.add_argument("--jobs", type=int, metavar="N", help="runs at a time (default: 1; Ray: all)")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value of every run")
    sweep.add_argument("--out", help="the sweep directory (default: sweeps/<config name>)")
    sweep.set_defaults(func=_sweep)

    merge = commands.add_parser("merge", help="align and merge saved models; the loss barrier between them",
                                description="Align the models of run directories (their model.safetensors) to "
                                "the first one and merge them all; report the loss along the straight path from "
                                "the first model to each other one, plain and aligned, with the loss barrier. "
                                "Writes merged.safetensors, merge.json and barrier.png into --out.")
    merge.add_argument("models", nargs="+", metavar="MODEL", help="run directories (or their model.safetensors)")
    merge.add_argument("--method", default="weight",
                       help="weight (Git Re-Basin weight matching, the default), activation, ot (optimal "
                       "transport fusion, needs fedloom[merging]) or average (no alignment)")
    merge.add_argument("--data", metavar="CONFIG", help="evaluate on this config's data (default: the first run's)")
    merge.add_argument("--points", type=int, default=11, help="models on each path (default: 11)")
    merge.add_argument("--out", default="merged", help="output directory (default: merged)")
    merge.set_defaults(func=_merge)

    fedma = commands.add_parser("fedma", help="FedMA: layer-wise matched averaging of the config's clients",
                                description="FedMA (Wang et al. 2020) on every client of the config, with its "
                                "[fedma] keys: the clients train, each hidden layer is matched (PFNM's "
                                "Beta-Bernoulli matching, layers may grow) and averaged, the layers above retrain. "
                                "Prints the clients' mean, the naive average's and FedMA's test metrics and the "
                                "widths; writes fedma.json and model.safetensors into --out.")
    fedma.add_argument("config", nargs="?", help="experiment config, .toml or .yaml (default: built-in defaults)")
    fedma.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as with --set")
    fedma.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    fedma.add_argument("--out", default="fedma", help="output directory (default: fedma)")
    fedma.set_defaults(func=_fedma)


def _compare(args: argparse.Namespace) -> int:
    from datetime import datetime

    from fedloom.tracking.compare import expand, load_runs, render_compare, table

    runs, problems = load_runs(expand(args.run_dirs))
    for problem in problems:
        _print_error("skipped", problem)
    if not runs:
        _print_error("error", "no usable run directory among those given")
        return 2
    out = Path(args.out or f"compare-{datetime.now():%Y%m%d-%H%M%S}")
    written = render_compare(runs, out, problems)
    console.print(_grid_table(f"fedloom compare: {len(runs)} runs", *table(runs)))
    console.print(f"compare written: {written[0]} ({len(written) - 1} tables and plots beside it)")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from fedloom.config import ConfigError
    from fedloom.sweep import parse_grid, parse_seeds, sweep

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give at least 1")
    seeds = parse_seeds(args.seeds) if args.seeds else None
    overrides = _overrides(args)  # first: a config that is an override moves out of args.config
    result = sweep(args.config, parse_grid(args.grid), seeds, overrides, args.jobs, args.out,
                   report=lambda line: console.print(Text(line)))
    console.print(f"sweep {result.out}: {len(result.ran)} run, {len(result.skipped)} already done")
    console.print(_grid_table("fedloom sweep: mean ± std over seeds", result.columns, result.rows,
                              heads=result.columns.index("runs")))  # the grid keys head the columns
    console.print("written: " + ", ".join(p.name for p in result.written))
    unfinished = [name for name, status in result.statuses.items() if status != "completed"]
    if result.interrupted:
        err_console.print(f"interrupted; {len(unfinished)} runs not completed: rerun the same command to continue")
        return 130
    for name in unfinished:
        _print_error("not completed", f"{name}: {result.statuses[name] or 'no summary'} "
                     f"{result.errors.get(name, '')}".rstrip())
    return 1 if unfinished else 0


def _merge(args: argparse.Namespace) -> int:
    from fedloom.merging.runs import MergeError, merge_runs

    if args.points < 3:
        _print_error("error", f"--points {args.points}: give at least 3")
        return 2
    try:
        report = merge_runs(args.models, args.method, args.data, args.out, args.points)
    except MergeError as err:
        _print_error("error", err)
        return 2
    table = Table(title=f"fedloom merge ({args.method}): loss barrier from {report['models'][0]}")
    for column in ("model", "barrier plain", f"barrier {args.method}"):
        table.add_column(column)
    for pair in report["pairs"]:
        table.add_row(Text(pair["model"]), f"{pair['barrier_plain']:.4f}", f"{pair['barrier_aligned']:.4f}")
    console.print(table)
    merged, average = report["merged"], report["average"]
    console.print(Text(f"merged ({args.method}): " + _metrics_line(merged) + "; averaged: " + _metrics_line(average)))
    console.print(f"written: {Path(args.out) / 'merge.json'}, barrier.png, merged.safetensors")
    return 0


def _fedma(args: argparse.Namespace) -> int:
    from fedloom.merging.fedma import FedMAError, fedma

    overrides = _overrides(args)
    try:
        result = fedma(args.config, overrides)
    except FedMAError as err:
        _print_error("error", err)
        return 2
    written = result.write(args.out)
    rows = result.table()
    table = Table(title=f"fedloom fedma: {len(result.clients)} clients")
    table.add_column("model")
    metrics = list(rows["fedma"])
    for metric in metrics:
        table.add_column(metric)
    for label, key in (("client mean", "client_mean"), ("averaged", "average"), ("FedMA", "fedma")):
        table.add_row(label, *(f"{rows[key][m]:.4f}" for m in metrics))
    console.print(table)
    console.print(Text("widths: " + ", ".join(f"{name} {width}" for name, width in rows["widths"].items())))
    console.print(f"written: {', '.join(str(p) for p in written)}")
    return 0


def _metrics_line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _grid_table(title: str, columns: list[str], rows: list[list], heads: int = 1) -> Table:
    """Transposed: a column per row (a run, a grid point), headed by its first ``heads`` cells, and a line
    per other column, so many metrics of a few runs fit a terminal."""
    from fedloom.tracking.report import format_value

    table = Table(title=title)
    table.add_column(", ".join(columns[:heads]))
    for row in rows:
        table.add_column(Text(", ".join(str(v) for v in row[:heads]) or "all runs"), overflow="fold")
    for i, column in enumerate(columns[heads:], heads):
        table.add_row(Text(column), *(Text("" if row[i] is None else format_value(row[i])) for row in rows))
    return table


def _print_error(label: str, message: object) -> None:
    """One line, the message as plain text (a config key in brackets is not rich markup)."""
    err_console.print(Text.assemble((f"{label}: ", "bold red"), str(message)), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
