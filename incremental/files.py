"""File modes for what other processes read: versions, the pointer, exports and the embedded base.

A serving process often runs as another user of the same group; a file it cannot read is an outage
that no test on one account shows.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    """This process's umask. Linux reports it; elsewhere it is read by setting it, which briefly
    applies 022 to files other threads create."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_with_group(path: Path) -> None:
    """Give `path` the mode a plain open() or mkdir() would under this process's umask, and at least
    group read (and, for a folder, traverse): a serving process of another user in the group must be
    able to read a version. safetensors writes its files 0600 and mkdtemp makes folders 0700, whatever
    the umask."""
    folder = path.is_dir() and not path.is_symlink()
    default, group = (0o777, 0o050) if folder else (0o666, 0o040)
    os.chmod(path, (default & ~_umask()) | group)


def share_tree_with_group(root: Path) -> None:
    """`share_with_group` for a folder and everything in it."""
    for folder, _, names in os.walk(root):
        share_with_group(Path(folder))
        for name in names:
            share_with_group(Path(folder) / name)
