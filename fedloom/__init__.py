"""fedloom: federated and decentralized learning with PyTorch."""

import importlib
import importlib.util

__version__ = "0.1.0"
__all__ = ["run", "load_config", "RunResult"]


def __getattr__(name: str):
    # Lazy, so that `fedloom --help` does not pay for importing torch.
    if name in ("run", "RunResult"):
        from fedloom import runner

        return getattr(runner, name)
    if name == "load_config":
        from fedloom.config import load_config

        return load_config
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # fedloom.algorithms without importing it first
    raise AttributeError(f"module 'fedloom' has no attribute {name!r}")
