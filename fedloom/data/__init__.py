"""Data: bundled and user datasets, partitioners, and the federated view engines read."""

from .datasets import DataError, Dataset, from_arrays
from .hf import from_hf_dataset
from .torch_data import from_torch_dataset
from .loaders import DATASETS, load_dataset
from .federated import FederatedData, federate
from .partition import PARTITIONERS, dirichlet, iid, natural, partition, quantity_skew, shards

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "DataError",
    "Dataset",
    "FederatedData",
    "dirichlet",
    "federate",
    "from_arrays",
    "from_hf_dataset",
    "from_torch_dataset",
    "iid",
    "load_dataset",
    "natural",
    "partition",
    "quantity_skew",
    "shards",
]
