"""The embedded base: built in-process, cached atomically, loadable with the Auto classes, deterministic."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import incremental.embedded as embedded
from incremental.embedded import MARKER, PRETRAIN_LAYOUT, EmbeddedBaseSpec, ensure_embedded_base
from incremental.prompting import PROMPT_LAYOUTS, build_prompt
from incremental.synthetic import RELATED_TASKS, generate_cases, related_task_pairs

pytestmark = pytest.mark.integration

# Builds in about a second: enough to exercise every step, not to learn anything.
TINY = EmbeddedBaseSpec(
    vocab_size=300,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    tokenizer_cases=100,
    pretrain_examples=64,
    pretrain_steps=4,
    warmup_steps=1,
    batch_size=8,
    eval_cases=6,
)

UNICODE_TEXTS = [
    "Grüße aus Köln: naïve café, ½ price — “quoted” ‘text’",
    "会议记录：用户有姓名和邮箱。 日本語のメモ 🙂🚀 👩‍💻",
    "tabs\tand\nnewlines\r\n  leading spaces and trailing  ",
    "looks special: <s> </s> <pad> <unk> ### Task: erd",
    "",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return ensure_embedded_base(tmp_path_factory.mktemp("embedded"), TINY)


def test_loads_with_auto_classes(built):
    assert built.name == TINY.fingerprint()
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer) == TINY.vocab_size
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id, "a prompt starts with bos, as Llama's does"
    assert tokenizer("hi", add_special_tokens=False).input_ids[0] != tokenizer.bos_token_id
    assert not list(built.glob("*.bin")) and list(built.glob("*.safetensors")), "weights are safetensors only"
    ids = tokenizer(build_prompt("erd", "A member has a name.", prompt_layout=PRETRAIN_LAYOUT), return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], TINY.vocab_size)


def test_marker_holds_spec_and_measurements_and_is_written_last(built):
    info = json.loads((built / MARKER).read_text())
    assert info["spec"] == json.loads(json.dumps(TINY.__dict__))
    assert info["fingerprint"] == built.name
    assert set(info["prompt_gain"]) >= {"real", "erd", "api", "prototype", *RELATED_TASKS}
    assert all(isinstance(v, float) for v in info["prompt_gain"].values())
    assert info["pretrain_loss"] > 0 and info["wall_seconds"] > 0 and info["parameters"] > 0
    marker_time = (built / MARKER).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= marker_time for p in built.iterdir())


def test_second_call_reuses_the_cache(built, monkeypatch):
    def no_rebuild(*_args):
        raise AssertionError("rebuilt a cached base")

    monkeypatch.setattr(embedded, "_build", no_rebuild)
    assert ensure_embedded_base(built.parent, TINY) == built


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(spec, out):
        (out / "config.json").write_text("{}")  # half-written output
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(embedded, "_build", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        ensure_embedded_base(tmp_path, TINY)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_folder_without_marker_is_rebuilt(tmp_path):
    stale = tmp_path / TINY.fingerprint()
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = ensure_embedded_base(tmp_path, TINY)
    assert (path / MARKER).is_file()
    AutoModelForCausalLM.from_pretrained(path)


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    real_build = embedded._build

    def counting_build(spec, out):
        calls.append(out)
        return real_build(spec, out)

    monkeypatch.setattr(embedded, "_build", counting_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_embedded_base(tmp_path, TINY))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


def test_same_spec_builds_the_same_weights_and_another_seed_does_not(built, tmp_path):
    again = ensure_embedded_base(tmp_path / "again", TINY)
    first, second = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (built / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = EmbeddedBaseSpec(**{**TINY.__dict__, "seed": 1})
    assert other.fingerprint() != TINY.fingerprint()
    third = load_file(ensure_embedded_base(tmp_path / "other", other) / "model.safetensors")
    assert not all(torch.equal(first[k], third[k]) for k in first)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_tokenizer_round_trips_any_text(built, text):
    tokenizer = AutoTokenizer.from_pretrained(built)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # Byte-level: nothing is unknown. Special-token strings typed in the text map to those tokens,
    # as with Llama's tokenizer, and still decode to the same text.
    assert "<unk>" in text or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_default_tokenizer_keeps_sequences_short():
    """With the default spec's BPE, the synthetic tasks fit the token budget the brief sets."""
    tokenizer = embedded._train_tokenizer(EmbeddedBaseSpec())

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    cases = generate_cases(300, 42)
    notes = [length(c.notes) for c in cases]
    assert 20 <= sum(notes) / len(notes) <= 60 and max(notes) <= 90
    for case in cases:
        assert length(case.artifact) <= 180
        assert 2 + max(length(build_prompt(case.artifact_type, case.notes, prompt_layout=n)) for n in PROMPT_LAYOUTS) + length(case.artifact) < 320
    assert max(2 + length(p) + length(t) for p, t in related_task_pairs(300, 42, prompt_layout=PRETRAIN_LAYOUT)) < 320
    bytes_per_token = sum(len(c.notes.encode()) for c in cases) / sum(notes)
    assert bytes_per_token >= 3, "the BPE should make notes several times shorter than bytes"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 31), ("vocab_size", 100), ("pretrain_steps", 0), ("warmup_steps", 10), ("code_share", 1.0),
        ("related_tasks", ("erd",)), ("invented_name_share", 1.5), ("invented_name_share", -0.1),
    ],
)
def test_invalid_spec_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EmbeddedBaseSpec(**{**TINY.__dict__, field: value})


BUILD_ONE = """
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from incremental.embedded import EmbeddedBaseSpec, ensure_embedded_base
print(ensure_embedded_base(Path(sys.argv[1]), EmbeddedBaseSpec(**json.loads(sys.argv[2]))))
"""


def test_two_processes_build_into_one_cache_once_and_the_other_says_it_waits(tmp_path):
    import dataclasses
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    spec = json.dumps(dataclasses.asdict(TINY))
    builders = [
        subprocess.Popen([sys.executable, "-c", BUILD_ONE, str(tmp_path), spec], cwd=root,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [builder.communicate(timeout=600) for builder in builders]
    assert all(builder.returncode == 0 for builder in builders), [err[-2000:] for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    logs = "\n".join(err for _, err in outputs)
    assert len(paths) == 1
    assert logs.count("Building the embedded base model") == 1
    # The one that lost the race says so, unless it only arrived after the build had finished.
    assert "waiting for it" in logs or logs.count("Embedded base model ready") == 1
    embedded.check_base_files(Path(paths.pop()))  # every file as the builder wrote it: never a torn cache


def test_invented_names_make_another_base_and_leave_the_default_cache_folder_alone(built, tmp_path):
    """A base pretrained on invented names is another base (its own folder, other weights and tokenizer);
    adding the option did not move the default base's cache folder, so existing lineages keep theirs."""
    assert EmbeddedBaseSpec().fingerprint() == "9ba752df4664f96e"  # the folder every earlier release built
    assert EmbeddedBaseSpec(invented_name_share=0.0).fingerprint() == EmbeddedBaseSpec().fingerprint()
    invented = EmbeddedBaseSpec(**{**TINY.__dict__, "invented_name_share": 0.5})
    assert invented.fingerprint() != TINY.fingerprint()
    other = ensure_embedded_base(tmp_path, invented)
    assert other.name == invented.fingerprint()
    assert json.loads((other / "embedded.json").read_text())["spec"]["invented_name_share"] == 0.5
    assert (other / "tokenizer.json").read_text() != (built / "tokenizer.json").read_text()
