"""Continuous LoRA fine-tuning from user feedback, with a quality gate.

The library: plain Python, no Prefect. One module per stage of the loop (feedback store, dataset,
training, evaluation, gate, registry); `tasks/` and `flows/` wrap these for Prefect.
"""
