"""Model merging: permutation specs, alignment (Git Re-Basin's weight and activation matching, optimal
transport fusion), merging and loss barriers, one-shot federated learning, FedMA, ``fedloom merge``. Pure
functions on models and state dicts (docs/architecture.md, "Model merging")."""

from fedloom.merging.fedma import FedMAError, FedMAResult, fedma
from fedloom.merging.matching import activation_matching, ot_fusion, weight_matching
from fedloom.merging.merge import METHODS, Aligner, barrier, interpolate, mean_state, merge, path
from fedloom.merging.one_shot import OneShotResult, one_shot
from fedloom.merging.runs import MergeError, merge_runs
from fedloom.merging.transform import matched_averaging
from fedloom.merging.spec import (Alignment, Axis, PermutationSpec, Probe, Segment, SpecError, apply,
                                  random_permutation, resnet_spec, sequential_spec, spec_for)

__all__ = ["METHODS", "Aligner", "Alignment", "Axis", "FedMAError", "FedMAResult", "MergeError", "OneShotResult",
           "PermutationSpec", "Probe", "Segment", "SpecError", "activation_matching", "apply", "barrier", "fedma",
           "interpolate", "matched_averaging", "mean_state", "merge", "merge_runs", "one_shot", "ot_fusion", "path",
           "random_permutation", "resnet_spec", "sequential_spec", "spec_for", "weight_matching"]
