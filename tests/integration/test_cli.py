"""The `incremental` command line on a real DuckDB file and version tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from incremental.synthetic import synthetic_feedback

pytestmark = pytest.mark.integration
runner = CliRunner()


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_import_status_preview(env, tmp_path):
    rows = synthetic_feedback(20, 5, model="tiny")
    result = runner.invoke(app, ["feedback", "import", str(write_jsonl(tmp_path / "f.jsonl", rows))])
    assert result.exit_code == 0, result.output
    assert "Imported 20 rows" in result.output

    status = runner.invoke(app, ["status"])
    assert status.exit_code == 0, status.output
    assert "Base Mode: no accepted version of tiny; next training will be v1" in status.output and "20 rows" in status.output

    preview = runner.invoke(app, ["dataset", "preview", "--examples", "2"])
    assert preview.exit_code == 0, preview.output
    assert "builds on base model" in preview.output and "new" in preview.output

    versions = runner.invoke(app, ["versions"])
    assert "No versions of tiny yet" in versions.output


def test_feedback_add_from_files(env, tmp_path):
    (tmp_path / "notes.txt").write_text("We track books and members.")
    (tmp_path / "out.md").write_text("erDiagram\n  BOOK {\n    string title\n  }")
    result = runner.invoke(
        app,
        ["feedback", "add", "--type", "erd", "--rating", "good",
         "--notes", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "out.md")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Stored feedback" in result.output


def test_bad_import_is_refused_whole_with_a_clear_message(env, tmp_path):
    rows = synthetic_feedback(3, 6, model="tiny")
    rows[1]["rating"] = "great"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    environment = {**os.environ, "INCREMENTAL_DB_PATH": str(env.db_path), "INCREMENTAL_MODELS_ROOT": str(env.models_root)}
    done = subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "feedback", "import", str(path)],
        capture_output=True, text=True, env=environment, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "bad.jsonl:2" in done.stdout and "rating" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    status = runner.invoke(app, ["status"])
    assert "0 rows" in status.output  # nothing partial was stored


def test_rollback_of_unknown_version_names_it(env):
    result = runner.invoke(app, ["rollback", "v9_20250101_000000"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "v9_20250101_000000" in result.output


def test_csv_import_skip_invalid_then_export_and_reimport_changes_nothing(env, tmp_path):
    import csv

    rows = synthetic_feedback(6, 8, model="tiny")
    rows[2]["artifact_type"] = "diagram"
    path = tmp_path / "ratings [export].csv"  # brackets must not be read as Rich markup
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "artifact_type", "prompt", "output", "rating", "correction"])
        writer.writeheader()
        writer.writerows({name: row.get(name) for name in writer.fieldnames} for row in rows)

    refused = runner.invoke(app, ["feedback", "import", str(path)])
    assert refused.exit_code == 2 and "artifact_type" in refused.output, refused.output

    skipped = runner.invoke(app, ["feedback", "import", str(path), "--skip-invalid"])
    assert skipped.exit_code == 0, skipped.output
    assert "Imported 5 rows" in skipped.output and "1 invalid rows were not stored" in skipped.output
    rejects = [json.loads(line) for line in (tmp_path / "ratings [export].rejected.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and "artifact_type" in json.dumps(rejects[0]["problems"])

    again = runner.invoke(app, ["feedback", "import", str(path), "--skip-invalid"])
    assert "Imported 0 rows" in again.output and "5 were already stored" in again.output

    exported = runner.invoke(app, ["feedback", "export", str(tmp_path / "all.parquet")])
    assert exported.exit_code == 0 and "Exported 5 rows" in exported.output
    twice = runner.invoke(app, ["feedback", "export", str(tmp_path / "all.parquet")])
    assert twice.exit_code == 2 and "--overwrite" in twice.output, twice.output
    reimported = runner.invoke(app, ["feedback", "import", str(tmp_path / "all.parquet")])
    assert "Imported 0 rows" in reimported.output and "5 were already stored" in reimported.output


def test_doctor_reports_a_crash_leftover_and_repair_removes_it(env):
    import os
    import time

    folder = env.models_root / "tiny"
    folder.mkdir(parents=True)
    leftover = folder / ".current.json.999.tmp"
    leftover.write_text("{}")
    old = time.time() - 2 * 86400
    os.utime(leftover, (old, old))

    found = runner.invoke(app, ["doctor"])
    assert found.exit_code == 0, found.output
    assert ".current.json.999.tmp" in found.output and "yes (--repair)" in found.output
    repaired = runner.invoke(app, ["doctor", "--repair"])
    assert repaired.exit_code == 0 and "repaired: removed .current.json.999.tmp" in repaired.output
    assert not leftover.exists() and "No problems found" in repaired.output
