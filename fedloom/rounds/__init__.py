"""What one round is, for each mode: federated (``federated.py``), decentralized
(``decentralized.py``), asynchronous (``asynchronous.py``: one server update on the virtual clock); the deployment's coordinator is a federated round whose
engine is remote (``fedloom.deploy.server``).

A round object holds the run's constant parts (data, model, algorithm, engine,
pipeline) and no state: ``init_state()`` gives the state tree, ``play(state, r)``
returns the next one and the round's metrics record, leaving ``state`` as it was.
"""

from fedloom.rounds.base import Round, build_round

__all__ = ["Round", "build_round"]
