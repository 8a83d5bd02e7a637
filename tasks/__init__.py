"""Thin Prefect tasks over the library stages in `incremental/`: one task per stage.

Tasks take and return small serializable things (settings, names, paths, frozen results), load
models inside themselves, never cache side effects, and retry only idempotent reads.
"""
