"""Serving on the small real base: generations recorded with the version that produced them, ratings
linked to them, pinned versions, a promotion during a stream of requests (one switch, no failed
request, a request in flight finishes on its version), versions that fail to load (not switched to,
the error reported, the old version keeps serving), and the HTTP endpoint."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from conftest import finalize_version

from incremental import layout, serving
from incremental.feedback import AlreadyRatedError
from incremental.http_api import make_server
from incremental.modeling import Hardware, ResolvedBase, load_base, load_scoring_model
from incremental.prompting import PROMPT_LAYOUTS
from incremental.registry import Registry
from incremental.scoring import generate_greedy
from incremental.serving import BASE, GenerationRequestError, Generator

pytestmark = pytest.mark.integration
CPU = Hardware(device="cpu", quantization="none")
NOTES = "Members borrow books. A book has a title and an author; a member has a name."
TOKENS = 6  # enough to tell the versions' outputs apart, little enough to keep a request near 0.1 s
WAIT_S = 120  # hang guard for threads and HTTP calls: far above what any of them takes


def make_version(registry: Registry, small_base: Path, seed: int, *, config_r: int | None = None) -> str:
    """A finished version (promoted: it names the current version as its parent) with a real LoRA adapter
    whose B matrices are not zero, so each seed's version says something else. `config_r` writes
    another rank into its adapter_config.json than its tensors have: it finalizes, but does not load."""
    torch.manual_seed(seed)
    network = get_peft_model(
        load_base(str(small_base), None, CPU), LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    def write(staging: Path) -> None:
        network.save_pretrained(staging)
        (staging / "README.md").unlink()  # a version folder holds the adapter and manifest only
        if config_r is not None:
            config_path = staging / layout.ADAPTER_CONFIG
            config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": config_r}))

    return finalize_version(registry, str(small_base), write)


@pytest.fixture
def serving_v1(env, env_store, small_base):
    """v1 and v2, v1 current, and a Generator serving v1: a promotion to v2 is one pointer move away."""
    registry = Registry(env.models_root, "tiny")
    v1 = make_version(registry, small_base, seed=1)
    v2 = make_version(registry, small_base, seed=2)
    registry.rollback(v1)
    return registry, v1, v2, Generator("tiny", env)


def feedback_row(db_path: Path, row_id: str) -> dict:
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        cursor = con.execute(
            "SELECT prompt, output, rating, correction, generated_by, source, artifact_type, rater FROM feedback WHERE id = ?", [row_id]
        )
        names = [column[0] for column in cursor.description]
        return dict(zip(names, cursor.fetchone()))
    finally:
        con.close()


def switches(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "🔁 Serving" in record.getMessage()]


def test_generations_are_recorded_with_their_version_and_a_rating_links_to_them(env, env_store, small_base):
    registry = Registry(env.models_root, "tiny")
    v1 = make_version(registry, small_base, seed=1)
    v2 = make_version(registry, small_base, seed=2)

    generator = Generator("tiny", env)  # the current version: v2
    assert generator.version == v2 and generator.status().mode == "incremental"
    generation = generator.generate("erd", NOTES, max_new_tokens=TOKENS)
    assert (
        generation.version == v2 and generation.output and generation.decoding == {"do_sample": False, "max_new_tokens": TOKENS}
    )
    stored = env_store.generation(generation.id)
    assert (stored.model, stored.version, stored.artifact_type, stored.notes, stored.output, stored.decoding) == (
        "tiny", v2, "erd", NOTES, generation.output, generation.decoding,
    )  # fmt: skip

    feedback_id = generator.rate(generation.id, "needs_improvement", correction="erDiagram\n  BOOK {\n  }")
    assert feedback_id == generation.id
    assert feedback_row(env.db_path, feedback_id) == {
        "prompt": NOTES, "output": generation.output, "rating": "needs_improvement", "correction": "erDiagram\n  BOOK {\n  }",
        "generated_by": v2, "source": "rate", "artifact_type": "erd", "rater": None,
    }  # fmt: skip
    with pytest.raises(AlreadyRatedError, match=generation.id):
        generator.rate(generation.id, "good")

    # Pinned: another version, or the base alone; each generation records who produced it.
    pinned = Generator("tiny", env, version=v1, follow=False)
    on_v1 = pinned.generate("erd", NOTES, max_new_tokens=TOKENS)
    on_base = Generator("tiny", env, version=BASE).generate("erd", NOTES, max_new_tokens=TOKENS)
    assert (on_v1.version, on_base.version) == (v1, None)
    assert len({generation.output, on_v1.output, on_base.output}) == 3  # three models, three answers
    assert [g.version for g in env_store.recent_generations("tiny")] == [None, v1, v2]
    loaded = serving.load_model("tiny", env, version=v1)  # the one-shot loader pins too
    assert (loaded.version, serving.generate_artifact(loaded, "erd", NOTES, max_new_tokens=TOKENS)) == (v1, on_v1.output)

    with pytest.raises(ValueError, match="follow"):
        Generator("tiny", env, version=v1, follow=True)
    with pytest.raises(GenerationRequestError, match="artifact_type 'diagram'"):
        generator.generate("diagram", NOTES)
    with pytest.raises(GenerationRequestError, match="notes: empty"):
        generator.generate("erd", "  \n")
    with pytest.raises(GenerationRequestError, match="max_new_tokens 0"):
        generator.generate("erd", NOTES, max_new_tokens=0)
    with pytest.raises(GenerationRequestError, match="exceed the model's context"):
        generator.generate("erd", NOTES, max_new_tokens=10**6)


def test_a_promotion_during_a_stream_of_requests_switches_exactly_once_and_no_request_fails(serving_v1, env, env_store, small_base, caplog):
    caplog.set_level(logging.INFO, logger="incremental")
    registry, v1, v2, generator = serving_v1
    assert generator.version == v1

    done: list[list[tuple[str | None, str]]] = [[], []]  # (version, output) per client, in order
    errors: list[BaseException] = []
    moved = threading.Event()

    def client(mine: list[tuple[str | None, str]]) -> None:
        try:
            after_move = 0
            while after_move < 3 and len(mine) < 40:
                generation = generator.generate("erd", NOTES, max_new_tokens=TOKENS)
                mine.append((generation.version, generation.output))
                after_move += moved.is_set()
        except Exception as error:  # noqa: BLE001 - a failed request is what the test looks for
            errors.append(error)

    clients = [threading.Thread(target=client, args=(mine,), daemon=True) for mine in done]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + WAIT_S
    while sum(map(len, done)) < 4 and time.monotonic() < deadline and not errors:
        time.sleep(0.01)
    registry.rollback(v2, reason="a promotion, as far as the pointer is concerned")
    moved.set()
    for thread in clients:
        thread.join(timeout=WAIT_S)
    assert not any(thread.is_alive() for thread in clients), "a client hung"
    assert errors == []

    for mine in done:  # each client saw v1, then v2, never back
        versions = [version for version, _ in mine]
        first_v2 = versions.index(v2)
        assert versions == [v1] * first_v2 + [v2] * (len(versions) - first_v2), versions
    everything = [pair for mine in done for pair in mine]
    assert sum(version == v1 for version, _ in everything) >= 4
    outputs = {version: {output for seen, output in everything if seen == version} for version in (v1, v2)}
    assert len(outputs[v1]) == 1 and len(outputs[v2]) == 1 and outputs[v1] != outputs[v2]  # really two adapters
    assert switches(caplog) == [f"[INCREMENTAL] 🔁 Serving {v2} (was {v1})"]
    assert generator.last_error is None and set(generator._network.peft_config) == {v2}  # the old adapter unloaded
    recorded = env_store.recent_generations("tiny", limit=100)
    assert sorted((g.version, g.output) for g in recorded) == sorted(everything)


def test_the_gate_judges_what_users_are_served(env, env_store, small_base):
    """One decoder: the evaluation stage's batched greedy generations (left-padded batches of notes of
    several lengths, two adapters loaded side by side) equal what the server returns one request at a
    time for the same version and notes."""
    registry = Registry(env.models_root, "tiny")
    v1 = make_version(registry, small_base, seed=1)
    notes = [
        NOTES,
        "A ship has a name.",
        "Teams enter races. A race has a date, a course and a start time; a team has a name, a skipper and a boat.",
        "Vines grow in plots; a plot has a soil and a slope.",
        "Members borrow books.",
    ]
    prompts = [(artifact_type, text) for text in notes for artifact_type in ("erd", "api", "prototype")]
    version_dir = registry.get(v1).path
    scoring_model, tokenizer = load_scoring_model(
        ResolvedBase(registry.get(v1).manifest.base_model, str(small_base)), CPU, {"candidate": version_dir, "parent": version_dir}
    )
    scoring_model.set_adapter("candidate")
    by_layout = {}
    # Each prompt layout the version's manifest may name (the manifest is not among the hashed files).
    for prompt_layout in PROMPT_LAYOUTS:
        manifest = registry.root / v1 / layout.MANIFEST
        manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"prompt_layout": prompt_layout}))
        served = [Generator("tiny", env, version=v1, follow=False).generate(t, n, max_new_tokens=24).output for t, n in prompts]
        batched = generate_greedy(scoring_model, tokenizer, prompts, max_new_tokens=24, prompt_layout=prompt_layout, batch_size=4)
        assert batched == served, prompt_layout
        assert len(set(served)) > 1  # the notes lead somewhere different: the comparison is not of empty strings
        by_layout[prompt_layout] = served
    assert by_layout[1] != by_layout[2]  # the server really prompts in the layout the manifest names


def test_a_request_in_flight_finishes_on_the_version_it_started_with(serving_v1, env, env_store, small_base, monkeypatch):
    registry, v1, v2, generator = serving_v1
    v1_output = generator.generate("erd", NOTES, max_new_tokens=TOKENS).output

    entered, release = threading.Event(), threading.Event()
    decode = serving._decode

    def held_decode(*args, **kwargs):
        if not entered.is_set():  # only the first request waits, inside the model lock
            entered.set()
            assert release.wait(WAIT_S)
        return decode(*args, **kwargs)

    monkeypatch.setattr(serving, "_decode", held_decode)
    results: dict[str, object] = {}

    def request(name: str) -> None:
        try:
            results[name] = generator.generate("erd", NOTES, max_new_tokens=TOKENS)
        except Exception as error:  # noqa: BLE001 - reported by the asserts below
            results[name] = error

    in_flight = threading.Thread(target=request, args=("in flight",), daemon=True)
    in_flight.start()
    assert entered.wait(WAIT_S)
    registry.rollback(v2)
    next_one = threading.Thread(target=request, args=("next",), daemon=True)
    next_one.start()
    next_one.join(timeout=1.0)
    assert next_one.is_alive() and generator.version == v1  # the switch waits for the request in flight
    release.set()
    in_flight.join(timeout=WAIT_S)
    next_one.join(timeout=WAIT_S)
    assert results["in flight"].version == v1 and results["in flight"].output == v1_output
    assert results["next"].version == v2 and results["next"].output != v1_output


def test_a_damaged_version_is_not_switched_to_and_the_old_one_keeps_serving(serving_v1, env, env_store, small_base, caplog):
    caplog.set_level(logging.INFO, logger="incremental")
    registry, v1, v2, generator = serving_v1
    v1_output = generator.generate("erd", NOTES, max_new_tokens=TOKENS).output

    registry.rollback(v2)  # refused if v2 were damaged already: it is damaged after the pointer moved
    weights = registry.root / v2 / layout.ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))

    generation = generator.generate("erd", NOTES, max_new_tokens=TOKENS)
    assert (generation.version, generation.output) == (v1, v1_output)
    assert generator.version == v1 and f"not switched from {v1}: {v2}" in generator.last_error
    assert "adapter_model.safetensors changed" in generator.last_error
    assert generator.status().last_error == generator.last_error
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and v2 in errors[0]
    generator.generate("erd", NOTES, max_new_tokens=TOKENS)  # not tried again until the pointer moves
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    registry.rollback(v1, reason="v2 is damaged")
    assert generator.generate("erd", NOTES, max_new_tokens=TOKENS).version == v1 and generator.last_error is None
    assert switches(caplog) == []


def test_an_adapter_that_does_not_fit_is_not_switched_to_from_base_mode_or_from_a_version(env, env_store, small_base):
    registry = Registry(env.models_root, "tiny")
    generator = Generator("tiny", env)  # Base Mode: no version yet
    base_output = generator.generate("erd", NOTES, max_new_tokens=TOKENS).output

    misfit = make_version(registry, small_base, seed=3, config_r=8)
    generation = generator.generate("erd", NOTES, max_new_tokens=TOKENS)
    assert generation.version is None and f"the adapter of {misfit}" in generator.last_error
    assert generation.output == base_output and not isinstance(generator._network, PeftModel)
    assert not any(isinstance(module, BaseTunerLayer) for module in generator._network.modules())  # its own layers back

    v2 = make_version(registry, small_base, seed=2)
    on_v2 = generator.generate("erd", NOTES, max_new_tokens=TOKENS)
    assert on_v2.version == v2 and on_v2.output != base_output and generator.last_error is None

    misfit_again = make_version(registry, small_base, seed=4, config_r=8)
    again = generator.generate("erd", NOTES, max_new_tokens=TOKENS)
    assert (again.version, again.output) == (v2, on_v2.output) and misfit_again in generator.last_error
    assert set(generator._network.peft_config) == {v2}  # the half-loaded adapter was deleted

    registry.rollback(None, reason="back to the base model")
    on_base = generator.generate("erd", NOTES, max_new_tokens=TOKENS)
    assert (on_base.version, on_base.output) == (None, base_output) and generator.status().mode == "base"
    registry.rollback(v2)
    assert generator.generate("erd", NOTES, max_new_tokens=TOKENS).output == on_v2.output


def call(base_url: str, method: str, path: str, body: object = None, *, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_generate_and_rate_round_trip_and_bad_requests_name_the_field(env, env_store, small_base):
    registry = Registry(env.models_root, "tiny")
    v1 = make_version(registry, small_base, seed=1)
    server = make_server(Generator("tiny", env), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert call(url, "GET", "/health") == (
            200,
            {"model": "tiny", "version": v1, "mode": "incremental", "follow": True, "last_error": None},
        )
        status, generated = call(url, "POST", "/generate", {"artifact_type": "api", "notes": NOTES, "max_new_tokens": TOKENS})
        assert status == 200 and generated["version"] == v1 and generated["output"], generated
        assert env_store.generation(generated["id"]).output == generated["output"]

        status, answer = call(url, "POST", "/rate", {"generation_id": generated["id"], "rating": "good", "rater": "a\nb"})
        assert status == 400 and "field 'rater'" in answer["error"], answer
        assert call(url, "POST", "/rate", {"generation_id": generated["id"], "rating": "good", "rater": "ana"}) == (
            200, {"feedback_id": generated["id"], "generation_id": generated["id"]},
        )  # fmt: skip
        row = feedback_row(env.db_path, generated["id"])
        assert (row["generated_by"], row["prompt"], row["output"], row["source"], row["rater"]) == (
            v1, NOTES, generated["output"], "http", "ana",
        )  # fmt: skip
        status, again = call(url, "POST", "/rate", {"generation_id": generated["id"], "rating": "good"})
        assert status == 409 and "already rated" in again["error"]
        status, unknown = call(url, "POST", "/rate", {"generation_id": "nope", "rating": "good"})
        assert status == 404 and "'nope'" in unknown["error"] and "incremental generate" in unknown["error"]

        bad = {
            "artifact_type": {"artifact_type": "diagram", "notes": NOTES},
            "notes": {"artifact_type": "erd"},
            "max_new_tokens": {"artifact_type": "erd", "notes": NOTES, "max_new_tokens": "5"},
            "temperature": {"artifact_type": "erd", "notes": NOTES, "temperature": 0.7},
        }
        for field, body in bad.items():
            status, answer = call(url, "POST", "/generate", body)
            assert status == 400 and answer["error"].startswith(field), (field, answer)
        status, answer = call(url, "POST", "/rate", {"generation_id": generated["id"], "rating": "great"})
        assert status == 400 and "rating 'great'" in answer["error"]
        status, answer = call(url, "POST", "/generate", raw=b"{not json")
        assert status == 400 and answer["error"].startswith("body: not UTF-8 JSON")
        status, answer = call(url, "POST", "/generate", [1, 2])
        assert status == 400 and answer["error"].startswith("body: must be a JSON object")
        assert call(url, "GET", "/nope")[0] == 404
        assert len(env_store.recent_generations("tiny")) == 1  # refused requests generated nothing
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=WAIT_S)
