"""Sweeps of the paper's ablations: sweep.py trains them, costs.py measures what they cost."""
