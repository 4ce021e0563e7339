"""GPU: W1, W3 and CIFAR-10 ResNet-20 (GroupNorm) on one CUDA device, every contestant side by side.

    python bench/gpu.py [--workloads w1,w3,cifar] [--only fedloom-vectorized,plain] [--rounds N]
                        [--cifar PATH] [--device cuda:N] [--budget S] [--timeout S] [--out DIR] [--allow-cpu]

Contestants: fedloom-vectorized and fedloom-serial with engine.device = cuda; the
plain PyTorch loop with its model and the whole data set on the GPU; Flower 1.22
with each ClientApp actor asking Ray for 0.1 of the GPU (client_resources num_gpus
= 0.1, num_cpus = 1: ten actors share it). Flower runs from bench/.venvs/flower-cuda,
built on first use: `pip install --index-url https://pypi.org/simple torch==2.13.0`
(PyPI's torch wheel for Linux x86-64 is the CUDA build, about 2.5 GB with its
nvidia-* wheels), then flwr[simulation]. A machine that cannot reach PyPI leaves
Flower out and says why. fedloom and the plain loop run on the torch of the
interpreter that runs this script, whatever it is.

Workloads: W1 (digits MLP, 1,000 clients, 100 a round: framework overhead), W3
(MNIST-5k LeNet-5, 20 clients a round, 5 epochs: small compute) as in w1.py and
w3.py, and CIFAR-10 with ResNet-20 GroupNorm(2 groups): FedAvg, 100 clients,
Dirichlet(0.3), 10 a round, 2 epochs of batch 32, SGD lr 0.05. --cifar PATH is
torchvision's cifar-10-batches-py folder (or its parent); without it random
images and labels of CIFAR-10's exact shape and size (50,000 + 10,000 uint8
32x32 RGB images in the same files) are written to bench/.cache/cifar10-random/
and read by the same loader: the times hold, the accuracy is chance.

Without CUDA it stops with exit code 2; --allow-cpu runs the fedloom contestants
and the plain loop on the CPU instead (a smoke test, not a measurement).
Results: DIR/gpu.json, DIR/gpu.md and DIR/gpu-<workload>.png (DIR: bench/results).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

from common import CACHE, FEDLOOM_PYTHON, RESULTS, Workload, chart, cli, ratio_lines, report, run_workload
from w1 import W1
from w3 import W3

CONTESTANTS = ["fedloom-vectorized", "fedloom-serial", "plain", "flower"]
WORKLOADS = ["w1", "w3", "cifar"]
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
RANDOM_NOTE = ("CIFAR-10 data: RANDOM images and labels of CIFAR-10's exact shape and size (no --cifar PATH "
               "given): the times are meaningful, the accuracy is chance")


def cifar_workload(path: str) -> Workload:
    return Workload(name="cifar", title="CIFAR-10, ResNet-20 GroupNorm(2), Dirichlet(0.3), 100 clients, 10 a round, "
                    "2 epochs, batch 32, lr 0.05", dataset="cifar10", model="resnet20", n_clients=100,
                    clients_per_round=10, rounds=20, lr=0.05, batch_size=32, epochs=2,
                    partition={"name": "dirichlet", "options": {"alpha": 0.3}},
                    data_options={"path": path, "normalize": True})


def random_cifar(root: Path) -> Path:
    """CIFAR-10's six batch files with random contents (10,000 uint8 images [N, 3072] and labels 0-9 each)
    in the pickle layout torchvision extracts, which fedloom's cifar10 loader reads; written once."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    if all((folder / name).is_file() for name in CIFAR_FILES):
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in CIFAR_FILES:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 10_000).tolist()}
        part = folder / f"{name}.part"  # a run cut short never leaves a half file under the real name
        with part.open("wb") as f:
            pickle.dump(batch, f, protocol=4)
        part.replace(folder / name)
    return root


def checked_device(device: str, allow_cpu: bool) -> str:
    """``device`` when CUDA has it; else exit 2 with why (or, with --allow-cpu, "cpu" and a warning)."""
    import torch

    if not device.startswith("cuda"):
        raise SystemExit(f"error: --device {device}: give cuda or cuda:N (--allow-cpu falls back to the CPU)")
    if torch.cuda.is_available() and (torch.device(device).index or 0) < torch.cuda.device_count():
        return device
    why = ("this torch is a CPU-only build" if torch.version.cuda is None else
           f"torch sees {torch.cuda.device_count()} CUDA device(s)")
    problem = f"bench/gpu.py runs on a CUDA GPU ({device}), but {why} (torch {torch.__version__})."
    if not allow_cpu:
        print(f"error: {problem} Run it on a machine with one (bench/gpu_check.sh runs the GPU tests, then this), "
              "or pass --allow-cpu to smoke-test the fedloom contestants and the plain loop on the CPU.",
              file=sys.stderr)
        raise SystemExit(2)
    print(f"warning: {problem} --allow-cpu: the fedloom contestants and the plain loop run on the CPU, without "
          "Flower; a smoke test, not a measurement.", file=sys.stderr)
    return "cpu"


def gpu_name(device: str) -> str:
    """The GPU as a child process sees it (a fresh interpreter, as every contestant is)."""
    if device == "cpu":
        return "cpu"
    code = (f"import torch; p = torch.cuda.get_device_properties({device!r}); print(f'{{p.name}}, "
            "{p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')")
    out = subprocess.run([FEDLOOM_PYTHON, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def extra_lines(record: dict, note: str | None) -> list[str]:
    pairs = [("fedloom-vectorized", other, None) for other in ("fedloom-serial", "plain", "flower")]
    pairs += [("fedloom-serial", "plain", None), ("fedloom-serial", "flower", None)]
    return ([f"- {note}"] if note else []) + ratio_lines(record, pairs)


def write(records: list[tuple[dict, list[str]]], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = "\n\n".join(report(record, extra) for record, extra in records)
    (out / "gpu.json").write_text(json.dumps({"workloads": [record for record, _ in records]}, indent=1))
    (out / "gpu.md").write_text(md + "\n")
    for record, _ in records:
        chart(record, out / f"{record['tag']}.png")
    print(f"\nwrote {out / 'gpu.json'}, {out / 'gpu.md'}", file=sys.stderr)
    return md


def own_args(parser) -> None:
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {WORKLOADS}")
    parser.add_argument("--cifar", default=None, help="torchvision's cifar-10-batches-py folder (default: random data "
                        "of CIFAR-10's shape and size)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, smoke-test on the CPU instead of "
                        "stopping (fedloom contestants and the plain loop)")
    parser.add_argument("--flower-gpus", type=float, default=0.1, help="Ray's GPU share per Flower ClientApp actor")
    parser.add_argument("--budget", type=float, default=600, help="seconds for the whole run: contestants left "
                        "past it are skipped (default %(default)g)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where gpu.json and gpu.md go (default "
                        "bench/results)")
    parser.set_defaults(timeout=240)


def main() -> None:
    args = cli(__doc__, "W1 5, W3 15, CIFAR 20", CONTESTANTS, own_args)
    workloads = [k.strip() for k in args.workloads.split(",") if k.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"error: unknown workload(s) {unknown}; choose from {WORKLOADS}")
    device = checked_device(args.device, args.allow_cpu)
    contestants = [c for c in args.only if device != "cpu" or c != "flower"]
    deadline, gpu = time.time() + args.budget, gpu_name(device)
    print(f"[gpu] device {device}: {gpu}", file=sys.stderr, flush=True)
    where = f"on {device} ({gpu}), one CPU thread each" if device != "cpu" else "on the CPU (--allow-cpu smoke test)"
    records = []
    for key in workloads:
        w, note = {"w1": W1, "w3": W3}.get(key), None
        if key == "cifar":
            note = None if args.cifar else RANDOM_NOTE
            w = cifar_workload(args.cifar or str(random_cifar(CACHE / "cifar10-random")))
            print(f"[gpu] {note or 'CIFAR-10 from ' + args.cifar}", file=sys.stderr, flush=True)
        record = run_workload(w, contestants, args.rounds, args.timeout, {"flower": ["--gpus-per-client",
                              str(args.flower_gpus)]}, tag=f"gpu-{key}", device=device, deadline=deadline)
        record.update(gpu=gpu, where=where, data_note=note)
        records.append((record, extra_lines(record, note)))
    print(write(records, args.out))


if __name__ == "__main__":
    main()
