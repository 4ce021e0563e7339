"""Personalization: models that differ per client (``[personalization]``, docs/architecture.md).

A method trains the round's sampled clients (``train``: the rows for the server, shared
coordinates only) and gives each client's own model for evaluation (``client_models``).
What is personal lives in the state tree's ``clients`` store; the method object holds
only its hyperparameters and the run's fixed setting.
"""

from __future__ import annotations

import inspect

from fedloom.personalization.apfl import APFL
from fedloom.personalization.base import Setting
from fedloom.personalization.ditto import Ditto
from fedloom.personalization.fedbabu import FedBABU
from fedloom.personalization.fedcac import FedCAC
from fedloom.personalization.fedloge import FedLoGe
from fedloom.personalization.fedper import FedPer
from fedloom.personalization.fedrep import FedRep
from fedloom.personalization.finetune import FineTune
from fedloom.personalization.split import Split, personal_names
from fedloom.registry import Registry

METHODS = Registry("personalization method", {
    "finetune": (FineTune, "local fine-tuning of the global model at evaluation (finetune_epochs), the baseline"),
    "fedper": (FedPer, "FedPer (Arivazhagan et al. 2019): personal layers (personal), shared body"),
    "fedrep": (FedRep, "FedRep (Collins et al. 2021): head epochs with the body frozen, then body epochs; "
               "personal head (head_epochs)"),
    "fedbabu": (FedBABU, "FedBABU (Oh et al. 2022): head frozen at its init in training, all fine-tuned at "
                "evaluation (finetune_epochs)"),
    "ditto": (Ditto, "Ditto (Li et al. 2021): personal model v pulled towards the global one, "
              "lambda (v - w) (ditto_lambda)"),
    "fedcac": (FedCAC, "FedCAC (Wu et al. 2023): each client's critical parameters (top fedcac_tau by sensitivity) "
               "averaged only with clients whose critical sets overlap, by a bar rising over fedcac_beta rounds"),
    "fedloge": (FedLoGe, "FedLoGe (Xiao et al. 2024): backbone under a fixed sparse ETF head (fedloge_sparsity), "
                "an aggregated auxiliary head and local heads, realigned by class-row norms (personal: the head)"),
    "apfl": (APFL, "APFL (Deng et al. 2020): personal v mixed with the global w, alpha v + (1 - alpha) w, alpha "
             "learned (apfl_alpha, adaptive_alpha, alpha_lr)"),
})


def build_personalization(cfg, spec, local):
    """The configured method, or None when ``personalization.method = "none"``."""
    p = cfg.personalization
    if p.method == "none":
        return None
    factory = METHODS.factory(p.method)
    split = Split(spec, personal_names(spec, p.personal) if factory.splits else ())
    takes = inspect.signature(factory).parameters
    options = {k: v for k, v in p.model_dump().items() if k in takes}
    return factory(Setting(split, local, cfg.seed), **options)


__all__ = ["APFL", "METHODS", "Ditto", "FedBABU", "FedCAC", "FedLoGe", "FedPer", "FedRep", "FineTune", "Setting", "Split",
           "build_personalization"]
