"""Data: bundled and user datasets, partitioners, and the federated view engines read."""

from .datasets import DataError, Dataset, from_arrays
from .hf import from_hf_dataset
from .torch_data import from_torch_dataset
from .loaders import DATASETS, load_dataset
from .federated import FederatedData, federate
from .partition import (
    NEEDS_LABELS,
    PARTITIONERS,
    dirichlet,
    dirichlet_classwise,
    exponential_sizes,
    iid,
    inner_dirichlet,
    linear_sizes,
    natural,
    partition,
    pathological,
    quantity_skew,
    shards,
    square_sizes,
)

__all__ = [
    "DATASETS",
    "NEEDS_LABELS",
    "PARTITIONERS",
    "DataError",
    "Dataset",
    "FederatedData",
    "dirichlet",
    "dirichlet_classwise",
    "exponential_sizes",
    "federate",
    "from_arrays",
    "from_hf_dataset",
    "from_torch_dataset",
    "iid",
    "inner_dirichlet",
    "linear_sizes",
    "load_dataset",
    "natural",
    "partition",
    "pathological",
    "quantity_skew",
    "shards",
    "square_sizes",
]
