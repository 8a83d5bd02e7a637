"""Prefect flows: wiring only. The `retrain` flow reads like the numbered steps of the loop."""
