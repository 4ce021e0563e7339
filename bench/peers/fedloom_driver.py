"""fedloom as a user runs it: ``fedloom.run(config)``, one engine.

    python fedloom_driver.py SPEC.json --engine vectorized|serial [--fused auto|off] [--rounds N] [--device cuda]
        [--profile out.prof] [--curve]

The config comes from the workload JSON (bench/common.py wrote it from the same
settings that built the shared .npz, so fedloom rebuilds exactly that data,
initial model and client sampling). Evaluation runs only after the last round,
on the global test set, as for the other contestants; per-round times are
fedloom's own ``round_seconds``. ``--curve`` evaluates after every round
(``evaluation.every = 1``) and times each evaluation, for bench/tta.py.
"""

from __future__ import annotations

import argparse
import time

T_START = time.perf_counter()

import torch  # noqa: E402

from shared import emit, one_thread  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--engine", choices=["vectorized", "serial"], required=True)
    parser.add_argument("--fused", choices=["auto", "off"], default=None, help="engine.fused (default: auto)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--device", default=None, help="engine.device (default: the workload's, auto)")
    parser.add_argument("--profile", default=None, help="write cProfile stats of the whole run here")
    parser.add_argument("--curve", action="store_true", help="test accuracy after every round (bench/tta.py)")
    args = parser.parse_args()
    one_thread()
    import json

    with open(args.spec) as f:
        spec = json.load(f)
    config = json.loads(json.dumps(spec["fedloom_config"]))
    config["engine"] = {**config.get("engine", {}), "name": args.engine}
    if args.device:
        config["engine"]["device"] = args.device
    if args.fused:
        config["engine"]["fused"] = args.fused
    if args.rounds:
        config["rounds"] = args.rounds
        config["evaluation"]["every"] = args.rounds
    curve: list[list[float]] = []
    if args.curve:
        config["evaluation"]["every"] = 1

    import fedloom

    def run():
        if not args.curve:
            return fedloom.run(config)
        from fedloom.config import load_config
        from fedloom.rounds.base import build_round
        from fedloom.runner import drive

        return drive(build_round(load_config(config)), on_round=curve_point(curve))  # fedloom.run, with a callback

    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        result = profiler.runcall(run)
        profiler.dump_stats(args.profile)
    else:
        result = run()
    times = [h["round_seconds"] for h in result.history]
    first_round_start = result.history[0]["wall_seconds"] - times[0] if result.history else 0.0
    emit({"round_seconds": times, "accuracy": result.final.get("central_accuracy"),
          "rounds_done": len(times), "engine": result.summary.get("engine"), "device": result.summary.get("device"),
          "setup_seconds": None, "experiment_setup_to_first_round": first_round_start,
          "torch_threads_after": torch.get_num_threads(), **({"curve": curve} if args.curve else {})})


def curve_point(curve: list[list[float]]):
    """The on_round callback of ``--curve``: [unix time, central accuracy, seconds of that round's
    evaluation] (FederatedRound.evaluate wrapped to time it)."""
    from fedloom.rounds.federated import FederatedRound

    evaluate, seconds = FederatedRound.evaluate, [0.0]

    def timed(self, state):
        began = time.perf_counter()
        try:
            return evaluate(self, state)
        finally:
            seconds[0] = time.perf_counter() - began

    FederatedRound.evaluate = timed

    def on_round(record):
        curve.append([time.time(), record["central_accuracy"], seconds[0]])

    return on_round


if __name__ == "__main__":
    main()
