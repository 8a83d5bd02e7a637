"""Ecosystem compatibility, proven on a really trained version of the tiny model.

A version folder loads with plain PEFT and no project code (in a subprocess that refuses to import
it) and gives the logits `load_model` gives; its adapter_config.json names the base portably, so a
copied tree loads elsewhere, while the project's own loading ignores that field (versions saved
with an absolute path still load). `incremental export --merged` writes a model that plain
transformers loads, with the logits of base + adapter. Everything a version, the pointer and an
export hold is readable by the group, under umask 022 and 027.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import case_table, eval_table
from typer.testing import CliRunner

from cli.main import app
from incremental import layout
from incremental.config import LoraSettings, RunConfig, TrainSettings
from incremental.dataset import assemble_plan
from incremental.export import EXPORT_RECORD, export_merged
from incremental.manifest import (
    BaseModelRef,
    DataRecord,
    GateRecord,
    Manifest,
    TrainingRecord,
)
from incremental.modeling import (
    Hardware,
    ResolvedBase,
    attach_trainable_adapter,
    count_trainable,
    load_base,
)
from incremental.registry import Registry
from incremental.serving import load_model
from incremental.settings import Settings
from incremental.training import train_candidate

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")
MODEL = "tiny"
TOLERANCE = 1e-5

# Runs in a fresh interpreter with the project's packages made unimportable: what a user of plain
# torch + transformers + peft sees. argv[1]: a JSON job; the logits go to job["out"] as JSON.
PLAIN_PEFT = r"""
import json, sys

PROJECT = {"incremental", "cli", "flows", "tasks", "deployments"}

class RefuseProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ImportError(f"plain PEFT must not need project code, but {name} was imported")
        return None

sys.meta_path.insert(0, RefuseProject())
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

job = json.loads(sys.argv[1])
ids = torch.tensor([job["ids"]])

def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits[0].tolist()

out = {}
if "base" in job:
    out["peft"] = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"]), job["version"]))
out["auto"] = logits(AutoPeftModelForCausalLM.from_pretrained(job["version"]))
assert not PROJECT & {name.split(".")[0] for name in sys.modules}
with open(job["out"], "w") as handle:
    json.dump(out, handle)
"""


def plain_peft(tmp_path: Path, cwd: Path, ids: list[int], version_dir: Path, base_dir: Path | None = None) -> dict:
    """Logits of the version loaded by plain PEFT in another process, run from `cwd`."""
    job = {"ids": ids, "version": str(version_dir), "out": str(tmp_path / "plain-logits.json")}
    if base_dir is not None:
        job["base"] = str(base_dir)
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, json.dumps(job)], check=False, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: torch.tensor(values) for name, values in json.loads(Path(job["out"]).read_text()).items()}


def manifest_for(name: str, parent: str | None, created_at: datetime, base: BaseModelRef, training: TrainingRecord) -> Manifest:
    return Manifest(
        name=name,
        model=MODEL,
        parent=parent,
        status="accepted",
        created_at=created_at,
        base_model=base,
        run_config={},
        libraries={},
        data=DataRecord(
            dataset_hash="a" * 64, eval_snapshot_hash="b" * 64, new_ids=(), replay_ids=(), eval_ids=(), n_train_examples=0
        ),
        training=training,
        scores={"candidate": {}, "parent": {}},
        gate=GateRecord(verdict="accept", reasons=("compatibility test",), policy={}),
    )


def write_scores(folder: Path) -> None:
    pq.write_table(pa.table({"example_id": ["row-1"], "target_nll": [1.0]}), folder / layout.SCORES)


def settings_at(home: Path) -> Settings:
    """Settings whose embedded cache is `home/embedded` and version tree `home/finetuned_models`."""
    return Settings(
        model=MODEL,
        base_model="embedded",
        device="cpu",
        models_root=home / "finetuned_models",
        embedded_cache_dir=home / "embedded",
        db_path=home / "feedback.duckdb",
    )


def logits_of(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_base):
    """A home folder laid out like `~/.cache/incremental`: the small base as the embedded base
    `embedded/<hash>`, and `finetuned_models/tiny` with v1, really trained and promoted."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(small_base, home / "embedded" / small_base.name)
    settings = settings_at(home)
    base = ResolvedBase(BaseModelRef(id="embedded", revision=small_base.name), str(home / "embedded" / small_base.name))
    snapshot = assemble_plan(case_table(32, 1), case_table(0, 0), eval_table(4, 5), eval_table(0, 0), golden=None).write(
        home / "work"
    )
    registry = Registry(settings.models_root, MODEL)
    reservation = registry.reserve(None)
    fast = TrainSettings(epochs=1, batch_size=8, learning_rate=5e-3, max_length=320)
    record = train_candidate(
        base, CPU, None, None, snapshot, RunConfig(train=fast), reservation.staging_dir,
        prompt_layout=1, show_progress_bar=False,  # manifest_for records no layout: 1, as schema 3 did
    )
    write_scores(reservation.staging_dir)
    result = registry.finalize(reservation, manifest_for(reservation.name, None, reservation.created_at, base.ref, record))
    assert result.promoted

    loaded = load_model(MODEL, settings)
    ids = loaded.tokenizer("erDiagram CUSTOMER ||--o{ ORDER : places", add_special_tokens=True)["input_ids"]
    expected = logits_of(loaded.model, ids)
    base_logits = logits_of(load_base(base.source, None, CPU), ids)
    # A LoRA B matrix still at zero would make every comparison below pass for the base alone.
    assert (expected - base_logits).abs().max() > 1e-3, "training left the adapter a no-op; the test would prove nothing"
    return {"home": home, "settings": settings, "version": result.path, "ids": ids, "logits": expected, "base": base}


def test_plain_peft_loads_a_version_with_the_logits_of_load_model(trained, tmp_path):
    home, version_dir = trained["home"], trained["version"]
    config = json.loads((version_dir / layout.ADAPTER_CONFIG).read_text())
    hash_ = Path(trained["base"].source).name
    assert config["base_model_name_or_path"] == f"embedded/{hash_}" and config["revision"] is None
    assert str(home) not in (version_dir / layout.ADAPTER_CONFIG).read_text()

    plain = plain_peft(tmp_path, home, trained["ids"], version_dir, base_dir=Path(trained["base"].source))
    torch.testing.assert_close(plain["peft"], trained["logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(plain["auto"], trained["logits"], atol=TOLERANCE, rtol=0)


def test_a_copied_tree_loads_elsewhere_and_old_absolute_paths_do_not_matter(trained, tmp_path):
    elsewhere = tmp_path / "another-machine"
    shutil.copytree(trained["home"], elsewhere, ignore=shutil.ignore_patterns("work"))
    settings = settings_at(elsewhere)
    registry = Registry(settings.models_root, MODEL)
    v1 = registry.current()
    copied = registry.adapter_dir(v1)  # every hash still matches: nothing was rewritten on the way

    plain = plain_peft(tmp_path, elsewhere, trained["ids"], copied)
    torch.testing.assert_close(plain["auto"], trained["logits"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(
        logits_of(load_model(MODEL, settings).model, trained["ids"]), trained["logits"], atol=TOLERANCE, rtol=0
    )

    # A version saved before adapter configs named the base portably: an absolute path of a machine
    # that is gone. Serving and continuing training take the base from the manifest, never from there.
    reservation = registry.reserve(v1)
    shutil.copyfile(copied / layout.ADAPTER_WEIGHTS, reservation.staging_dir / layout.ADAPTER_WEIGHTS)
    old_config = json.loads((copied / layout.ADAPTER_CONFIG).read_text())
    old_config["base_model_name_or_path"] = f"/home/gone/.cache/incremental/embedded/{Path(trained['base'].source).name}"
    (reservation.staging_dir / layout.ADAPTER_CONFIG).write_text(json.dumps(old_config), encoding="utf-8")
    manifest = registry.get(v1).manifest
    v2 = registry.finalize(
        reservation, manifest_for(reservation.name, v1, reservation.created_at, manifest.base_model, manifest.training)
    )
    assert v2.promoted
    served = load_model(MODEL, settings)
    assert served.version == v2.name
    torch.testing.assert_close(logits_of(served.model, trained["ids"]), trained["logits"], atol=TOLERANCE, rtol=0)
    base_dir = elsewhere / "embedded" / Path(trained["base"].source).name
    continued = attach_trainable_adapter(load_base(str(base_dir), None, CPU), registry.adapter_dir(v2.name), LoraSettings(), CPU)
    assert count_trainable(continued) > 0


def test_export_merged_loads_with_plain_transformers_and_equals_base_plus_adapter(trained, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = trained["settings"]
    for name, value in {
        "INCREMENTAL_MODELS_ROOT": settings.models_root, "INCREMENTAL_EMBEDDED_CACHE_DIR": settings.embedded_cache_dir,
        "INCREMENTAL_BASE_MODEL": "embedded", "INCREMENTAL_DEVICE": "cpu", "INCREMENTAL_MODEL": MODEL,
        "INCREMENTAL_DB_PATH": tmp_path / "feedback.duckdb",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))
    version = trained["version"].name
    out = tmp_path / "merged"
    runner = CliRunner()
    done = runner.invoke(app, ["export", version, "--merged", str(out)])
    assert done.exit_code == 0, done.output
    assert f"Exported {version} merged into embedded" in done.output

    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer_config.json", EXPORT_RECORD, "README.md"} <= names, names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".merged")], "a staging folder stayed"
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["version"] == version and record["base_model"] == {
        "id": "embedded",
        "revision": Path(trained["base"].source).name,
    }
    # How to prompt it is written down, in the version's layout (the fixture's manifest is of schema 3 style: layout 1).
    assert record["prompt_layout"] == 1 and record["prompt_example"].startswith("### Task: erd\n")
    assert record["prompt_example"] in (out / "README.md").read_text()

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.float32
    assert AutoTokenizer.from_pretrained(out)("erDiagram CUSTOMER ||--o{ ORDER : places")["input_ids"] == trained["ids"]
    torch.testing.assert_close(logits_of(merged, trained["ids"]), trained["logits"], atol=1e-4, rtol=1e-4)

    again = runner.invoke(app, ["export", version, "--merged", str(out)])
    assert again.exit_code == 2 and "is not empty" in again.output and "--overwrite" in again.output
    replaced = runner.invoke(app, ["export", version, "--merged", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = runner.invoke(app, ["export", version, "--merged", str(foreign), "--overwrite"])
    assert refused.exit_code == 2 and "only a previous export" in refused.output
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]
    inside = runner.invoke(app, ["export", version, "--merged", str(settings.models_root / MODEL / "merged")])
    assert inside.exit_code == 2 and "immutable" in inside.output
    unknown = runner.invoke(app, ["export", "v9_20250101_000000", "--merged", str(tmp_path / "none")])
    assert unknown.exit_code == 2 and "is not a finished version" in unknown.output


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def saved_version(registry: Registry, small_base: Path, quantization: str = "none"):
    """A finished, promoted version of an untrained adapter on the small base, written by the library
    calls a training makes: PEFT's save (safetensors writes its files 0600) and a Parquet table."""
    from peft import LoraConfig, get_peft_model

    reservation = registry.reserve(None)
    network = get_peft_model(
        load_base(str(small_base), None, CPU), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    network.save_pretrained(str(reservation.staging_dir))
    (reservation.staging_dir / "README.md").unlink()  # PEFT's model card; train_adapter drops it too
    write_scores(reservation.staging_dir)
    training = TrainingRecord(
        mode="base", device="cpu", quantization=quantization, steps=1, epochs=1.0, train_loss=1.0,
        trainable_parameters=1, target_tokens=1, wall_seconds=0.1,
    )  # fmt: skip
    manifest = manifest_for(reservation.name, None, reservation.created_at, BaseModelRef(id=str(small_base)), training)
    return registry.finalize(reservation, manifest)


def local_base_settings(tmp_path: Path, small_base: Path) -> Settings:
    return Settings(model=MODEL, base_model=str(small_base), device="cpu", models_root=tmp_path / "finetuned_models")


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_versions_the_pointer_and_exports_are_readable_by_the_group(umask, small_base, tmp_path):
    settings = local_base_settings(tmp_path, small_base)
    previous = os.umask(umask)
    try:
        registry = Registry(settings.models_root, MODEL)
        result = saved_version(registry, small_base)
        registry.rollback(None)  # the pointer rewritten atomically, the history appended to
        export = export_merged(settings, MODEL, result.name, tmp_path / "exports" / "merged")
    finally:
        os.umask(previous)

    file_mode, folder_mode = 0o666 & ~umask | 0o040, 0o777 & ~umask | 0o050
    paths = [result.path, *result.path.rglob("*"), registry.root / layout.CURRENT_POINTER, registry.root / layout.HISTORY]
    paths += [export.path, *export.path.rglob("*")]
    assert len(paths) > 10
    wrong = {str(path): oct(_mode(path)) for path in paths if _mode(path) != (folder_mode if path.is_dir() else file_mode)}
    assert not wrong, f"expected files {oct(file_mode)} and folders {oct(folder_mode)} under umask {oct(umask)}"


def test_the_embedded_base_is_readable_by_the_group(small_base):
    """Built in a mkdtemp folder (0700) with safetensors files (0600), then renamed: made group-readable
    first (the session's base was built under this process's umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    paths = [small_base, *small_base.rglob("*")]
    assert any(path.suffix == ".safetensors" for path in paths)
    expected = {True: 0o777 & ~umask | 0o050, False: 0o666 & ~umask | 0o040}
    wrong = {str(path): oct(_mode(path)) for path in paths if _mode(path) != expected[path.is_dir()]}
    assert not wrong


def test_a_version_trained_in_4bit_is_merged_onto_the_unquantized_base_and_says_so(small_base, tmp_path, caplog):
    settings = local_base_settings(tmp_path, small_base)
    version = saved_version(Registry(settings.models_root, MODEL), small_base, quantization="4bit")
    with caplog.at_level("INFO", logger="incremental"):
        export = export_merged(settings, MODEL, version.name, tmp_path / "merged")
    assert export.unquantized_from_4bit
    assert "trained on the 4-bit base; merging it onto the unquantized base" in caplog.text
    record = json.loads((export.path / EXPORT_RECORD).read_text())
    assert (record["trained_quantization"], record["merged_dtype"]) == ("4bit", "float32")
    assert "4-bit" in (export.path / "README.md").read_text()
