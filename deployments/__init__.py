"""Deployment declarations for the retrain flow: nightly schedule, manual runs, GPU work pools."""
