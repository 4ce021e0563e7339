"""The core pieces everything else is written with: ``ParamSpec`` (a model as one flat vector) and the seeded
random streams (``fedloom.core.rng``)."""
from fedloom.core.params import ParamSpec
from fedloom.core.rng import Stream, numpy_generator, seed_for, torch_generator

__all__ = ["ParamSpec", "Stream", "numpy_generator", "seed_for", "torch_generator"]
