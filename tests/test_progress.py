"""Progress: a live bar with an ETA on a terminal, plain lines every few rounds elsewhere."""

import io
import re
import subprocess
import sys

from rich.console import Console

from fedloom.progress import RoundProgress


def _records(n):
    return [{"round": r, "train_loss": 1.0 / r, **({"central_accuracy": r / 100} if r % 2 == 0 else {})}
            for r in range(1, n + 1)]


def _shown(console, total, done=0, every=None):
    with RoundProgress(total, done, every=every, console=console) as bar:
        for record in _records(total)[done:]:
            bar.update(record)
    return console.file.getvalue()


def test_not_a_terminal_prints_a_plain_line_every_tenth_of_the_rounds():
    lines = _shown(Console(file=io.StringIO()), 40).splitlines()
    assert [line.split()[1] for line in lines] == [f"{r}/40" for r in range(4, 41, 4)]
    assert re.fullmatch(r"round 8/40  loss 0\.125  acc 0\.080  eta \d:\d\d:\d\d", lines[1]), lines[1]
    every_3 = _shown(Console(file=io.StringIO()), 10, every=3).splitlines()
    assert [line.split()[1] for line in every_3] == ["3/10", "6/10", "9/10", "10/10"]  # and the last
    resumed = _shown(Console(file=io.StringIO()), 10, done=6, every=1).splitlines()
    assert [line.split()[1] for line in resumed] == ["7/10", "8/10", "9/10", "10/10"]


def test_the_terminal_bar_shows_an_eta():
    shown = _shown(Console(file=io.StringIO(), force_terminal=True, width=120), 5)
    assert "eta" in shown and "5/5" in shown and "round " in shown and "round 5/5  loss" not in shown


def test_fedloom_run_piped_prints_progress_lines():
    done = subprocess.run([sys.executable, "-m", "fedloom.cli", "run", "--progress-every", "2", "--set", "rounds=4",
                           "--set", "output.save=false", "--set", "model.name=logistic", "--set", "client.epochs=1"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("round ")] == ["2/4", "4/4"]
