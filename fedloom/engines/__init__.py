"""Engines: where and how the clients of a round train (vectorized, serial, Ray), behind one ``run_round``."""
