"""Names of the files and folders in the `finetuned_models/` tree, in one place.

finetuned_models/<model>/
    vN_YYYYMMDD_HHMMSS/          a finished version: immutable once it appears
        adapter_config.json
        adapter_model.safetensors
        scores.parquet           per-example scores of candidate and parent: the gate's evidence
        manifest.json            written last; its presence marks the folder complete
    current.json                 the pointer to the current accepted version
    history.jsonl                append-only log of pointer moves (promotions, rollbacks)
    .staging/                    versions being built: invisible to loaders
    .registry.lock               serializes reservations, finalization and pointer moves
"""

from __future__ import annotations

import re

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
SCORES = "scores.parquet"
CURRENT_POINTER = "current.json"
HISTORY = "history.jsonl"
STAGING_DIR = ".staging"
LOCK_FILE = ".registry.lock"

# Files a finished version folder holds, and nothing else: anything pickled is refused on load.
VERSION_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, SCORES})

VERSION_NAME = re.compile(r"^v(?P<number>[1-9][0-9]*)_(?P<stamp>[0-9]{8}_[0-9]{6})$")
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_TIME_FORMAT = "%Y%m%d_%H%M%S"


def version_name(number: int, stamp: str) -> str:
    """`v3_20251105_160000` from 3 and '20251105_160000'."""
    return f"v{number}_{stamp}"


def version_number(name: str) -> int:
    """3 from `v3_20251105_160000`; ValueError for anything that is not a version name."""
    match = VERSION_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a version name; expected vN_YYYYMMDD_HHMMSS, e.g. v3_20251105_160000")
    return int(match["number"])
