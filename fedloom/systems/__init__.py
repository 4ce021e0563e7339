"""The system model: how fast each client computes, how fast its links are, and when it is online.

``SystemModel`` (``model.py``) turns a client's local steps and payload bytes into virtual seconds;
``build_system`` makes it from ``[system]``: drawn from Stream.SYSTEM, or read from a CSV trace
(``trace.py``). The rounds read it; the runner's virtual clock adds up what they report.
"""

from fedloom.systems.model import SystemModel, build_system, speed_sigma
from fedloom.systems.trace import TraceError, read_trace

__all__ = ["SystemModel", "TraceError", "build_system", "read_trace", "speed_sigma"]
