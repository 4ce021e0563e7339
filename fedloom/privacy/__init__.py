"""Differential privacy (DP-FedAvg's clipping and noise, DP-FTRL, the accountants) and secure aggregation."""
