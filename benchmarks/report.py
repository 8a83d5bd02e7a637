"""Writing a benchmark's block into BENCHMARKS.md: between `<!-- NAME:start -->` and `<!-- NAME:end -->`,
replacing the previous block of that name, or appended at the end the first time."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_block(name: str, text: str, path: Path = BENCHMARKS) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in current:
        head, rest = current.split(start, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current, encoding="utf-8")
