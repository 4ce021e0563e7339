"""fedloom: federated and decentralized learning with PyTorch."""

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
    raise AttributeError(f"module 'fedloom' has no attribute {name!r}")
