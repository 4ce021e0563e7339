"""Write the golden records: ``python -m tests.golden.record [name ...]``."""

from __future__ import annotations

import json
import sys

import torch

from fedloom import run
from tests.golden.configs import GOLDEN, path_of, without_time


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names or GOLDEN:
        records = without_time(run(None, GOLDEN[name]).history)
        path_of(name).write_text("".join(json.dumps(r) + "\n" for r in records))
        print(name, records[-1].get("central_accuracy"))


if __name__ == "__main__":
    main(sys.argv[1:])
