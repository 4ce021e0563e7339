"""The server pipeline: what happens to the round's update matrix, step by step.

A chain of transforms in the manner of optax (``base.py``), built from the
config in one place (``build.py``). ``fedloom.pipeline.build.build_pipeline``
gives the run's chain; ``Pipeline.steps()`` names its transforms in order.
"""

from fedloom.pipeline.base import Context, Pipeline, Transform

__all__ = ["Context", "Pipeline", "Transform"]
