"""Build a run's dataset from collected feedback: new rows + a bounded replay of older rows for
training, the held-out rows for evaluation, and the tokenized prompt/target form of both.

Knows nothing about DuckDB (it receives Arrow tables from `feedback.FeedbackStore.collect`) or
about models beyond a tokenizer. The prompt tokens are masked from the loss with -100.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from incremental.config import DataSettings
from incremental.prompting import build_prompt

IGNORE_INDEX = -100  # label value the loss ignores (prompt and padding tokens)
TRAIN_FILE = "train.parquet"
EVAL_FILE = "eval.parquet"
_COLUMNS = ["id", "artifact_type", "prompt", "target"]


@dataclass(frozen=True)
class DatasetPlan:
    """The rows of one run, in memory. `train` has a `role` column (new|replay); `eval` a `slice`
    column: 'eval' (held-out trainable rows) or 'rejected' (needs-improvement outputs without a
    correction, scored but never trained on)."""

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
        return _ids(self.eval, "slice", "eval")

    @property
    def rejected_ids(self) -> tuple[str, ...]:
        return _ids(self.eval, "slice", "rejected")

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
            dataset_hash=content_hash(self.train),
            eval_snapshot_hash=content_hash(self.eval),
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
    new: pa.Table, learned: pa.Table, held_out: pa.Table, rejected: pa.Table, data: DataSettings, seed: int
) -> DatasetPlan:
    """Choose the train rows (all new rows + a replay sample of learned ones) and the eval rows.

    The replay sample is a deterministic function of the seed and the new rows, so a run can be
    reproduced from its manifest. Eval and rejected rows never enter `train`: the store's split
    and the trainable-rating rule keep them apart; the assertion guards that contract.
    """
    n_replay = min(round(data.replay_ratio * new.num_rows), data.max_replay_rows, learned.num_rows)
    rng = np.random.default_rng(_seed_from(seed, new))
    replay_rows = np.sort(rng.choice(learned.num_rows, size=n_replay, replace=False)) if n_replay else []
    replay = learned.select(_COLUMNS).take(pa.array(replay_rows, type=pa.int64()))
    train = pa.concat_tables(
        [
            _with_label(new.select(_COLUMNS), "role", "new"),
            _with_label(replay, "role", "replay"),
        ]
    )
    evaluation = pa.concat_tables(
        [
            _with_label(held_out.select(_COLUMNS), "slice", "eval"),
            _with_label(rejected.select(_COLUMNS), "slice", "rejected"),
        ]
    )
    leaked = set(train.column("id").to_pylist()) & set(evaluation.column("id").to_pylist())
    assert not leaked, f"eval rows in the train split: {sorted(leaked)[:5]}"
    return DatasetPlan(train=train, eval=evaluation)


def content_hash(table: pa.Table) -> str:
    """sha256 over the rows' ids and text, in order: names exactly what was trained or scored."""
    digest = hashlib.sha256()
    for column in _COLUMNS:
        for value in table.column(column).to_pylist():
            digest.update(str(value).encode("utf-8"))
            digest.update(b"\x1f")
    return digest.hexdigest()


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_examples(tokenizer, tasks, notes, targets, max_length: int) -> list[EncodedExample]:
    """Tokenize each prompt + target as one text and mask the prompt tokens from the loss.

    Tokenizing the whole text once (rather than prompt and target apart) keeps the tokens the
    same as at generation time; offsets tell which tokens belong to the target. Over-long
    examples lose the end of the target first, then the start of the notes. One batched call
    to the (Rust) fast tokenizer for all rows.
    """
    prompts = [build_prompt(task, note) for task, note in zip(tasks, notes)]
    texts = [prompt + target for prompt, target in zip(prompts, targets)]
    encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
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


def tokenize_train(table: pa.Table, tokenizer, max_length: int):
    """A `datasets.Dataset` of input_ids/labels for the trainer, and how many rows were cut."""
    import datasets  # deferred: importing datasets costs seconds, the CLI's light commands skip it

    encoded = encode_examples(
        tokenizer,
        table.column("artifact_type").to_pylist(),
        table.column("prompt").to_pylist(),
        table.column("target").to_pylist(),
        max_length,
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
