"""Start-up: `fedloom run --set rounds=1` from process start to exit against `python -c "import torch"`.

    python bench/startup.py [--repeats 5]

Each command runs ``--repeats`` times, one after the other, and the median wall seconds are reported with
fedloom's overhead over importing torch: `import fedloom.runner` alone, `fedloom run --set rounds=1` with
`output.save=false`, and the same writing its run directory (metrics, checkpoint, plots, the report).
The default experiment (digits, 100 clients, the MLP, 5 local epochs). Markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEDLOOM = str(Path(sys.executable).with_name("fedloom"))


def commands(out: str) -> dict[str, list[str]]:
    run = [FEDLOOM, "run", "--quiet", "--set", "rounds=1"]
    return {"python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "python -c 'import fedloom.runner'": [sys.executable, "-c", "import fedloom.runner"],
            "fedloom run --set rounds=1 --set output.save=false": [*run, "--set", "output.save=false"],
            "fedloom run --set rounds=1 (run directory and report)": [*run, "--set", f"output.dir={out}"]}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out:
        medians = {name: statistics.median(wall(cmd) for _ in range(args.repeats))
                   for name, cmd in commands(out).items()}
    torch_s = medians["python -c 'import torch'"]
    print(f"load average before/after: {before:.2f}/{os.getloadavg()[0]:.2f}, {args.repeats} runs each\n")
    print("| command | median wall s | over `import torch` s |\n|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| `{name}` | {seconds:.2f} | {seconds - torch_s:+.2f} |")


if __name__ == "__main__":
    main()
