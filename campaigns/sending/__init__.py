"""Sending one shard: the run (`run.py`), its retry decisions (`policy.py`), the mass-prune guard
(`guard.py`) and the ledger that records a run in one transaction (`ledger.py`)."""
