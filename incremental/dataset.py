"""Build a run's dataset from collected feedback: new rows + a bounded replay of older rows for
training, the held-out rows for evaluation, and the tokenized prompt/target form of both.

Knows nothing about DuckDB (it receives Arrow tables from `feedback.FeedbackStore.collect` and a
function that fetches rows by id) or about models beyond a tokenizer. The prompt tokens are masked from the loss with -100.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from incremental.config import DataSettings
from incremental.errors import InvalidFeedbackError
from incremental.feedback import CollectedFeedback
from incremental.prompting import ARTIFACT_TYPES, build_prompt

IGNORE_INDEX = -100  # label value the loss ignores (prompt and padding tokens)
TRAIN_FILE = "train.parquet"
EVAL_FILE = "eval.parquet"
_COLUMNS = ("id", "artifact_type", "prompt", "target")
EVAL_COLUMNS = ("id", "artifact_type", "prompt", "target", "rejected_output", "kind", "trusted", "slice")
_EVAL_SCHEMA = pa.schema([(name, pa.bool_() if name == "trusted" else pa.string()) for name in EVAL_COLUMNS])
GOLDEN_SLICE = "golden"


@dataclass(frozen=True)
class DatasetPlan:
    """The rows of one run, in memory. `train` has a `role` column (new|replay). `eval` has, per row:
    `kind` 'target' (a trainable eval row; `rejected_output` holds the rejected output when the row
    came with a correction) or 'rejected' (a needs-improvement output without a correction, scored but
    never trained: its `target` is that output); `trusted` (arrived before the parent was accepted);
    and `slice` 'golden' for a user's golden rows, '' otherwise (evaluation assigns the rest)."""

    train: pa.Table
    eval: pa.Table

    @property
    def new_ids(self) -> tuple[str, ...]:
        return _ids(self.train, "role", "new")

    @property
    def replay_ids(self) -> tuple[str, ...]:
        return _ids(self.train, "role", "replay")

    @property
    def eval_ids(self) -> tuple[str, ...]:
        return _ids(self._feedback_eval(), "kind", "target")

    @property
    def rejected_ids(self) -> tuple[str, ...]:
        return _ids(self._feedback_eval(), "kind", "rejected")

    @property
    def arrived_with_batch_ids(self) -> tuple[str, ...]:
        """Eval and rejected-output rows that arrived with the batch (not trusted): held with it if it fails."""
        rows = self._feedback_eval()
        return tuple(rows.filter(pc.invert(rows.column("trusted"))).column("id").to_pylist())

    def _feedback_eval(self) -> pa.Table:
        return self.eval.filter(pc.not_equal(self.eval.column("slice"), GOLDEN_SLICE))

    def write(self, work_dir: Path) -> "DatasetSnapshot":
        """Freeze the plan as Parquet files that the train and evaluate steps read."""
        work_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.train, work_dir / TRAIN_FILE)
        pq.write_table(self.eval, work_dir / EVAL_FILE)
        return DatasetSnapshot(
            work_dir=work_dir,
            new_ids=self.new_ids,
            replay_ids=self.replay_ids,
            eval_ids=self.eval_ids,
            rejected_ids=self.rejected_ids,
            arrived_with_batch_ids=self.arrived_with_batch_ids,
            dataset_hash=content_hash(self.train),
            eval_snapshot_hash=content_hash(self.eval, EVAL_COLUMNS),
        )


@dataclass(frozen=True)
class DatasetSnapshot:
    """A written dataset: small, serializable references passed between pipeline steps."""

    work_dir: Path
    new_ids: tuple[str, ...]
    replay_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]
    rejected_ids: tuple[str, ...]
    dataset_hash: str
    eval_snapshot_hash: str
    arrived_with_batch_ids: tuple[str, ...] = ()

    @property
    def train_path(self) -> Path:
        return self.work_dir / TRAIN_FILE

    @property
    def eval_path(self) -> Path:
        return self.work_dir / EVAL_FILE

    def read_train(self) -> pa.Table:
        return pq.read_table(self.train_path)

    def read_eval(self) -> pa.Table:
        return pq.read_table(self.eval_path)


def plan_dataset(
    collected: CollectedFeedback,
    data: DataSettings,
    *,
    seed: int,
    fetch_rows: Callable[[Sequence[str]], pa.Table],
    golden: pa.Table | None = None,
) -> DatasetPlan:
    """Choose the train rows (all new rows + a replay sample of learned ones) and the eval rows.

    The replay sample is a deterministic function of the seed and the new rows, drawn from the
    learned ids; only the sampled rows' text is fetched (`fetch_rows(ids)`, in the order given), so
    the cost is O(new + replay) whatever the history. Eval and rejected rows (the store's window,
    with its `trusted` column) never enter `train`: the store's split and the trainable-rating rule
    keep them apart; the assertion guards that contract. `golden` (id, artifact_type, prompt,
    target) is a user's file of reference rows, always trusted.
    """
    new, learned = collected.new, collected.learned
    # A small batch still gets min_replay_rows of replay: a few dozen corrections trained alone pull
    # what the parent already does well out of shape (measured: BENCHMARKS.md, gate quality).
    wanted = round(data.replay_ratio * new.num_rows)
    if data.replay_ratio > 0:
        wanted = max(wanted, data.min_replay_rows)
    n_replay = min(wanted, data.max_replay_rows, learned.num_rows)
    rng = np.random.default_rng(_seed_from(seed, new))
    picked = np.sort(rng.choice(learned.num_rows, size=n_replay, replace=False)) if n_replay else []
    replay_ids = learned.column("id").take(pa.array(picked, type=pa.int64())).to_pylist()
    replay = fetch_rows(replay_ids) if replay_ids else new.slice(0, 0)
    return assemble_plan(new, replay, collected.eval, collected.rejected, golden)


def assemble_plan(new: pa.Table, replay: pa.Table, held_out: pa.Table, rejected: pa.Table, golden: pa.Table | None) -> DatasetPlan:
    """The plan of the given rows in the given order: what `plan_dataset` chose, or a manifest's rows when rebuilt."""
    train = pa.concat_tables(
        [
            _with_label(new.select(list(_COLUMNS)), "role", "new"),
            _with_label(replay.select(list(_COLUMNS)), "role", "replay"),
        ]
    )
    parts = [
        _eval_rows(held_out, "target", held_out.column("trusted"), held_out.column("rejected_output")),
        _eval_rows(rejected, "rejected", rejected.column("trusted"), pa.nulls(rejected.num_rows, pa.string())),
    ]
    if golden is not None and golden.num_rows:
        n = golden.num_rows
        parts.append(_eval_rows(golden, "target", pa.array([True] * n), pa.nulls(n, pa.string()), slice_=GOLDEN_SLICE))
    evaluation = pa.concat_tables(parts)
    leaked = set(train.column("id").to_pylist()) & set(evaluation.column("id").to_pylist())
    assert not leaked, f"eval rows in the train split: {sorted(leaked)[:5]}"
    return DatasetPlan(train=train, eval=evaluation)


def rebuild_plan(
    *,
    new_ids: Sequence[str],
    replay_ids: Sequence[str],
    eval_ids: Sequence[str],
    rejected_ids: Sequence[str],
    fetch_rows: Callable[[Sequence[str]], pa.Table],
    trusted_before,
    golden: pa.Table | None = None,
) -> DatasetPlan:
    """A version's dataset again, from the ids its manifest lists and the stored rows (which never change).

    `trusted_before` is when the version's parent was accepted (None for a first version): eval rows
    that arrived by then were trusted. With the same golden file, the plan's `content_hash`es equal
    the manifest's `dataset_hash` and `eval_snapshot_hash`.
    """

    def fetched(ids: Sequence[str]) -> pa.Table:
        rows = fetch_rows(list(ids))
        trusted = pc.less_equal(rows.column("ingested_at"), pa.scalar(trusted_before, rows.schema.field("ingested_at").type)) \
            if trusted_before is not None else pa.array([False] * rows.num_rows)
        return rows.set_column(rows.schema.get_field_index("trusted"), "trusted", trusted)

    return assemble_plan(fetched(new_ids), fetched(replay_ids), fetched(eval_ids), fetched(rejected_ids), golden)


def _eval_rows(table: pa.Table, kind: str, trusted, rejected_output, *, slice_: str = "") -> pa.Table:
    n = table.num_rows
    return pa.table(
        {
            "id": table.column("id"),
            "artifact_type": table.column("artifact_type"),
            "prompt": table.column("prompt"),
            "target": table.column("target"),
            "rejected_output": rejected_output,
            "kind": pa.array([kind] * n, type=pa.string()),
            "trusted": trusted,
            "slice": pa.array([slice_] * n, type=pa.string()),
        },
        schema=_EVAL_SCHEMA,
    )


def read_golden(path: Path) -> pa.Table:
    """A golden file: JSONL rows with artifact_type, prompt (the notes), target (the right artifact), optional id.

    Errors name the line and the field. Ids default to `golden-<line>`.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (FileNotFoundError, IsADirectoryError):
        raise InvalidFeedbackError(f"golden file {path}: no such file; check INCREMENTAL_GOLDEN_PATH") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidFeedbackError(f"{path}:{number}: not valid JSON ({error.msg}); write one JSON object per line") from None
        if not isinstance(value, dict):
            raise InvalidFeedbackError(f"{path}:{number}: expected an object with artifact_type, prompt and target")
        for name in ("artifact_type", "prompt", "target"):
            if not isinstance(value.get(name), str) or not value[name].strip():
                raise InvalidFeedbackError(f"{path}:{number}: field '{name}' is missing or empty; give the {name} as text")
        if value["artifact_type"] not in ARTIFACT_TYPES:
            raise InvalidFeedbackError(
                f"{path}:{number}: field 'artifact_type': {value['artifact_type']!r}; use one of: {', '.join(ARTIFACT_TYPES)}"
            )
        rows.append({"id": str(value.get("id") or f"golden-{number}"), **{k: value[k] for k in _COLUMNS[1:]}})
    if not rows:
        raise InvalidFeedbackError(f"golden file {path} has no rows; add JSONL rows or unset INCREMENTAL_GOLDEN_PATH")
    return pa.Table.from_pylist(rows, schema=pa.schema([(name, pa.string()) for name in _COLUMNS]))


def content_hash(table: pa.Table, columns: Sequence[str] = _COLUMNS) -> str:
    """sha256 over the rows' ids and text, in order: names exactly what was trained or scored.

    The rows are joined into one string by Arrow kernels (fields by U+001F, rows by U+001E, a null
    as U+0000) and hashed once, so the cost is a few passes over the bytes, not a Python loop per value.
    """
    separator, row_end = pa.scalar("\x1f", pa.large_string()), pa.scalar("\x1e", pa.large_string())
    fields = [pc.cast(table.column(name), pa.large_string()) for name in columns]
    rows = pc.binary_join_element_wise(*fields, separator, null_handling="replace", null_replacement="\x00").combine_chunks()
    whole = pc.binary_join(pa.LargeListArray.from_arrays(pa.array([0, len(rows)], pa.int64()), rows), row_end)[0]
    return hashlib.sha256((whole.as_py() or "").encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_examples(tokenizer, tasks, notes, targets, max_length: int, *, prompt_layout: int) -> list[EncodedExample]:
    """Tokenize each prompt + target as one text and mask the prompt tokens from the loss.

    Tokenizing the whole text once (rather than prompt and target apart) keeps the tokens the
    same as at generation time; offsets tell which tokens belong to the target. Over-long
    examples lose the end of the target first, then the start of the notes. One batched call
    to the (Rust) fast tokenizer for all rows. Feedback text is text: "<s>", "</s>" or "<pad>" in
    it (an HTML strikethrough) become ordinary tokens, never the special ids; the only bos and eos
    are the ones added here.
    """
    prompts = [build_prompt(task, note, prompt_layout=prompt_layout) for task, note in zip(tasks, notes)]
    texts = [prompt + target for prompt, target in zip(prompts, targets)]
    encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    budget = max_length - len(bos) - len(eos)
    examples = []
    for prompt, ids, offsets in zip(prompts, encodings["input_ids"], encodings["offset_mapping"]):
        n_prompt = sum(1 for start, _ in offsets if start < len(prompt))
        prompt_ids, target_ids = ids[:n_prompt], ids[n_prompt:]
        truncated = len(prompt_ids) + len(target_ids) > budget
        if truncated:
            target_ids = target_ids[: max(budget - len(prompt_ids), budget // 4)]
            prompt_ids = prompt_ids[len(prompt_ids) - (budget - len(target_ids)) :]
        examples.append(
            EncodedExample(
                input_ids=bos + prompt_ids + target_ids + eos,
                labels=[IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + target_ids + eos,
                truncated=truncated,
            )
        )
    return examples


def tokenize_train(table: pa.Table, tokenizer, max_length: int, *, prompt_layout: int):
    """A `datasets.Dataset` of input_ids/labels for the trainer (prompts in `prompt_layout`), and how many rows were cut."""
    import datasets  # deferred: importing datasets costs seconds, the CLI's light commands skip it

    encoded = encode_examples(
        tokenizer,
        table.column("artifact_type").to_pylist(),
        table.column("prompt").to_pylist(),
        table.column("target").to_pylist(),
        max_length,
        prompt_layout=prompt_layout,
    )
    dataset = datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}
    )
    return dataset, sum(e.truncated for e in encoded)


def _ids(table: pa.Table, column: str, value: str) -> tuple[str, ...]:
    mask = pc.equal(table.column(column), value)
    return tuple(table.filter(mask).column("id").to_pylist())


def _with_label(table: pa.Table, column: str, value: str) -> pa.Table:
    return table.append_column(column, pa.array([value] * table.num_rows, type=pa.string()))


def _seed_from(seed: int, new: pa.Table) -> int:
    digest = hashlib.sha256(str(seed).encode())
    for row_id in new.column("id").to_pylist():
        digest.update(row_id.encode())
    return int.from_bytes(digest.digest()[:8], "big")
