"""Names of the files and folders in the `finetuned_models/` tree, in one place.

finetuned_models/<model>/
    vN_YYYYMMDD_HHMMSS/          a finished version: immutable once it appears
        adapter_config.json
        adapter_model.safetensors
        scores.parquet           per-example scores of candidate and parent: the gate's evidence
        manifest.json            written last; its presence marks the folder complete; holds the
                                 sha256 of every other file
    current.json                 the pointer to the current version, with the move that set it
    history.jsonl                append-only log of pointer moves (promotions, rollbacks)
    .staging/                    versions being built: invisible to loaders
        vN_YYYYMMDD_HHMMSS/      the files of a reserved version
        vN_YYYYMMDD_HHMMSS.owner.json   which process reserved it (pid, host, time): tells a live
                                 reservation from one a dead run left behind
    .registry.lock               serializes reservations, finalization and pointer moves
"""

from __future__ import annotations

import re
from pathlib import Path

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
OWNER_SUFFIX = ".owner.json"
HISTORY_TORN = "history.jsonl.torn"  # lines `incremental doctor --repair` took out of the history, kept

# Files that desktops drop into any folder a person opens (Finder, Explorer, KDE). They never shape
# a model's output: loading tolerates them, listing and the doctor report them.
JUNK_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "Desktop.ini", ".directory"})

VERSION_NAME = re.compile(r"^v(?P<number>[1-9][0-9]*)_(?P<stamp>[0-9]{8}_[0-9]{6})$")
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_TIME_FORMAT = "%Y%m%d_%H%M%S"
# `.current.json.<pid>.tmp`: a pointer being replaced atomically; one that stays was left by a crash.
TEMP_FILE = re.compile(r"^\.(?P<target>.+)\.(?P<pid>[0-9]+)\.tmp$")


def is_junk(name: str) -> bool:
    """A desktop's metadata file (`.DS_Store`, `Thumbs.db`, macOS `._*` resource forks), never a model file."""
    return name in JUNK_FILES or name.startswith("._")


def owner_file(staging_dir: Path) -> Path:
    """`.staging/vN_....owner.json`, beside the reserved folder (a version folder holds adapter files only)."""
    return staging_dir.with_name(staging_dir.name + OWNER_SUFFIX)


def temp_file(path: Path, pid: int) -> Path:
    """Where `path` is written before it is renamed over the old one (see `TEMP_FILE`)."""
    return path.with_name(f".{path.name}.{pid}.tmp")


def version_name(number: int, stamp: str) -> str:
    """`v3_20251105_160000` from 3 and '20251105_160000'."""
    return f"v{number}_{stamp}"


def version_number(name: str) -> int:
    """3 from `v3_20251105_160000`; ValueError for anything that is not a version name."""
    match = VERSION_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a version name; expected vN_YYYYMMDD_HHMMSS, e.g. v3_20251105_160000")
    return int(match["number"])
