"""The embedded base model: a tiny Llama and a byte-level BPE tokenizer, built and pretrained on CPU.

Both are trained in-process on synthetic meeting notes (`synthetic.py`), deterministically from a
spec, and cached on disk under the spec's hash, so the product runs with no model hub. The base
learns related tasks (notes -> outlines in indented, YAML and HTML layouts) and the bare syntax of the artifacts, never the
notes -> artifact pairs themselves: that is left to fine-tuning. The folder's name hashes the spec,
not the files, so the sha256 of every file is recorded at build time (`files.sha256.json`) and
checked whenever the base is used. It knows nothing of versions or adapters.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tokenizers
import torch
import transformers
from filelock import FileLock, Timeout
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from incremental.errors import ConfigurationError
from incremental.files import share_tree_with_group
from incremental.layout import is_junk
from incremental.synthetic import RELATED_TASKS, generate_cases, related_task_pairs

logger = logging.getLogger("incremental")

MARKER = "embedded.json"
MARKER_SCHEMA_VERSION = 1
# sha256 of every file that shapes the model's output, written just before the marker.
FILE_HASHES = "files.sha256.json"
# Bump when the recipe (corpus, tokenizer, training loop) changes, so old caches are not reused.
RECIPE_VERSION = 2

# The base is pretrained on related tasks in prompt layout 1 (`prompting.py`); adapters of either
# layout sit on it. A new pretraining layout would be a new recipe, and every cached base rebuilt.
PRETRAIN_LAYOUT = 1

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)


@dataclass(frozen=True)
class EmbeddedBaseSpec:
    """Everything that determines the embedded base; its hash names the cache folder.

    Defaults were measured on a 2-core CPU in float32: 0.5M parameters, about 120 s to build. Two
    layers for 550 steps beat four layers for 300 or 550 smaller steps in the same CPU time: the
    copying of names from the notes only sets in after several hundred steps (real-task prompt gain
    0.18 nats/token against about 0). `embedded.json` records the prompt gains reached.
    """

    vocab_size: int = 1024  # BPE vocabulary including the 4 special tokens
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 344
    max_positions: int = 512  # prompt + target of the synthetic tasks stay under 320 tokens
    tokenizer_cases: int = 1500  # meeting cases whose notes and artifacts train the tokenizer
    pretrain_examples: int = 6000  # notes -> related-task pairs, the related tasks taking turns
    related_tasks: tuple[str, ...] = RELATED_TASKS  # which related tasks (synthetic.RELATED_TASKS) to pretrain on
    code_share: float = 0.25  # share of pretraining examples that are bare artifacts (no notes)
    pretrain_steps: int = 550
    batch_size: int = 32
    learning_rate: float = 5e-3
    warmup_steps: int = 30
    share_variant_embeddings: bool = True  # one starting embedding for a word's space/case variants
    # Share of pretraining examples (and of the tokenizer's corpus) from invented domains, whose names
    # are made-up words: predicting them needs copying from the notes, as a real code LLM does. 0 keeps
    # the corpus's names only (the default so far; BENCHMARKS.md, replay recipe, compares 0.5).
    invented_name_share: float = 0.0
    eval_cases: int = 96  # held-out cases per task for the prompt-gain measurement
    seed: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name not in ("seed", "code_share", "related_tasks", "share_variant_embeddings", "invented_name_share") and not value > 0:
                raise ValueError(f"EmbeddedBaseSpec.{field.name}={value!r}: expected a positive number")
        if not self.related_tasks or not set(self.related_tasks) <= set(RELATED_TASKS):
            raise ValueError(
                f"EmbeddedBaseSpec.related_tasks={self.related_tasks!r}: expected a non-empty subset of {RELATED_TASKS}"
            )
        if not 0.0 <= self.invented_name_share <= 1.0:
            raise ValueError(f"EmbeddedBaseSpec.invented_name_share={self.invented_name_share}: expected a share in [0, 1]")
        if not 0.0 <= self.code_share < 1.0:
            raise ValueError(f"EmbeddedBaseSpec.code_share={self.code_share}: expected a share in [0, 1)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"EmbeddedBaseSpec.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick a hidden_size that is a multiple of num_heads"
            )
        if self.vocab_size <= len(SPECIAL_TOKENS) + 256:
            raise ValueError(f"EmbeddedBaseSpec.vocab_size={self.vocab_size}: must exceed 260 (256 bytes + 4 special tokens)")
        if self.warmup_steps >= self.pretrain_steps:
            raise ValueError(
                f"EmbeddedBaseSpec.warmup_steps={self.warmup_steps} must be below pretrain_steps={self.pretrain_steps}"
            )

    def code_examples(self) -> int:
        """How many bare artifacts join the `pretrain_examples` related-task pairs."""
        return round(self.pretrain_examples * self.code_share / (1.0 - self.code_share))

    def fingerprint(self) -> str:
        """A short content hash of the spec and the recipe: the cache folder's name."""
        fields_ = asdict(self)
        if not fields_["invented_name_share"]:  # added later: a spec without invented names keeps its cache folder
            del fields_["invented_name_share"]
        payload = json.dumps({"recipe": RECIPE_VERSION, **fields_}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_embedded_base(cache_dir: Path, spec: EmbeddedBaseSpec = EmbeddedBaseSpec()) -> Path:
    """The folder of the embedded base for `spec`, built on first use; loadable with `from_pretrained`.

    Built in a temporary folder next to the final one, `embedded.json` written last, then renamed,
    so the folder appears complete or not at all. A file lock makes concurrent callers build once.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_dir / spec.fingerprint()
    if (final / MARKER).is_file():
        check_base_files(final)
        return final
    lock = FileLock(str(cache_dir / f"{spec.fingerprint()}.lock"))
    try:
        with lock.acquire(timeout=0):
            pass
    except Timeout:  # only decides what to say: the wait itself is the `with` below
        logger.info("[INCREMENTAL] Another process is building the embedded base in %s; waiting for it", final)
    with lock:
        if (final / MARKER).is_file():  # another process built it while we waited
            check_base_files(final)
            return final
        if final.exists():
            # Only a rename creates `final`, after the marker is written; a folder without it was
            # left by hand or by a foreign tool, and building over it is the only way forward.
            logger.warning("[INCREMENTAL] Removing incomplete embedded base folder %s", final)
            shutil.rmtree(final)
        logger.info("[INCREMENTAL] Building the embedded base model (first use; cached in %s)", final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
        try:
            info = _build(spec, staging)
            _record_file_hashes(staging)
            (staging / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            share_tree_with_group(staging)  # mkdtemp and safetensors write 0700/0600: servers of the group read it
            staging.rename(final)
        except BaseException:  # interrupts too: a half-built staging folder must not survive
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info(
        "[INCREMENTAL] Embedded base model ready in %.0f s: pretrain loss %.3f, prompt gain %.3f nats/token (real tasks)",
        info["wall_seconds"], info["pretrain_loss"], info["prompt_gain"]["real"],
    )
    return final


def _record_file_hashes(folder: Path) -> None:
    hashes = {path.name: _sha256(path) for path in sorted(folder.iterdir()) if path.is_file()}
    (folder / FILE_HASHES).write_text(json.dumps({"sha256": hashes}, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@functools.cache  # once per folder and process: the base is loaded several times per run
def _warn_unchecked(folder: str) -> None:
    logger.warning(
        "[INCREMENTAL] The embedded base in %s has no %s (built by an older release), so its files "
        "cannot be checked; delete the folder to rebuild it with hashes", folder, FILE_HASHES,
    )  # fmt: skip


def check_base_files(folder: Path) -> None:
    """Refuse a base folder whose files differ from the hashes recorded when it was built.

    A folder without `files.sha256.json` (not built here, or by an older release) is not checked.
    ConfigurationError naming the file and the fix otherwise: a changed byte in the weights or the
    tokenizer makes every adapter on this base produce garbage without any other error.
    """
    folder = Path(folder)
    record = folder / FILE_HASHES
    if not record.is_file():
        if (folder / MARKER).is_file():
            _warn_unchecked(str(folder))
        return
    fix = f"delete {folder} and it is rebuilt on next use (a few minutes on a CPU)"
    try:
        expected = json.loads(record.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"the base model in {folder} is damaged: {FILE_HASHES} cannot be read ({exc}); {fix}") from exc
    present = {
        path.name: path
        for path in folder.iterdir()
        if path.name not in (FILE_HASHES, MARKER) and not is_junk(path.name)
    }
    for name in sorted(set(expected) | set(present)):
        if name not in present:
            problem = f"{name} is missing"
        elif name not in expected:
            problem = f"{name} was added after it was built"
        elif present[name].is_symlink() or not present[name].is_file():
            problem = f"{name} is a link or not a regular file"
        elif _sha256(present[name]) != expected[name]:
            problem = f"{name} changed after it was built (its sha256 does not match {FILE_HASHES})"
        else:
            continue
        raise ConfigurationError(f"the base model in {folder} is damaged: {problem}; {fix}")


def _build(spec: EmbeddedBaseSpec, out: Path) -> dict:
    started = time.perf_counter()
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    tokenizer = _train_tokenizer(spec)
    pairs = related_task_pairs(
        spec.pretrain_examples, spec.seed, spec.related_tasks, prompt_layout=PRETRAIN_LAYOUT, invented_share=spec.invented_name_share
    )
    examples = [_encode(tokenizer, prompt, target) for prompt, target in pairs]
    # Artifacts alone, with no notes before them, as a code model meets Mermaid, OpenAPI and HTML in
    # its pretraining: the base learns their syntax (a LoRA cannot move the embeddings of tokens it
    # never saw) but not which artifact a meeting's notes call for; that is fine-tuning's job.
    code = generate_cases(spec.code_examples(), spec.seed + 3, invented_share=spec.invented_name_share)
    examples += [_encode(tokenizer, "", case.artifact) for case in code]
    model = LlamaForCausalLM(_model_config(spec))
    if spec.share_variant_embeddings:
        _share_variant_embeddings(model, tokenizer)
    n_parameters = sum(p.numel() for p in model.parameters())
    logger.info(
        "[INCREMENTAL] Pretraining the embedded base (%d parameters) on %d notes->outline examples "
        "and %d bare artifacts for %d steps",
        n_parameters, spec.pretrain_examples, spec.code_examples(), spec.pretrain_steps,
    )
    pretrain_loss = _pretrain(model, examples, spec, tokenizer.pad_token_id)
    model.eval()
    real_triples = [(c.artifact_type, c.notes, c.artifact) for c in generate_cases(spec.eval_cases, spec.seed + 1)]
    related_triples = [
        (*_task_and_notes_of(p), t)
        for p, t in related_task_pairs(spec.eval_cases * len(RELATED_TASKS), spec.seed + 1, prompt_layout=PRETRAIN_LAYOUT)
    ]
    gains = _prompt_gain(model, tokenizer, real_triples)
    gains["real"] = gains.pop("all")
    related = _prompt_gain(model, tokenizer, related_triples)
    gains.update({task: related[task] for task in RELATED_TASKS})
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return {
        "schema_version": MARKER_SCHEMA_VERSION,
        "recipe_version": RECIPE_VERSION,
        "fingerprint": spec.fingerprint(),
        "spec": asdict(spec),
        "parameters": n_parameters,
        "pretrain_loss": pretrain_loss,
        # "real": erd, api and prototype cases together, token-weighted; then per task, related tasks
        # included (measured even when the spec leaves one out of pretraining).
        "prompt_gain": {task: g["gain"] for task, g in gains.items()},
        "target_nll": {task: g["own"] for task, g in gains.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }


def _train_tokenizer(spec: EmbeddedBaseSpec) -> PreTrainedTokenizerFast:
    """Byte-level BPE, so any text round-trips; `tokenizer(text)` prepends bos, as Llama's does."""
    cases = generate_cases(spec.tokenizer_cases, spec.seed + 2, invented_share=spec.invented_name_share)
    corpus = [c.notes for c in cases] + [c.artifact for c in cases]
    corpus += [
        prompt + target
        for prompt, target in related_task_pairs(
            spec.tokenizer_cases, spec.seed + 2, spec.related_tasks, prompt_layout=PRETRAIN_LAYOUT,
            invented_share=spec.invented_name_share,
        )
    ]
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=spec.max_positions,
    )


def _share_variant_embeddings(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Start ' email', 'email' and 'Email' (one word with or without a leading space, in any case) from
    the same embedding row.

    Notes write names after a space, HTML artifacts inside quotes and tags; with tied embeddings a
    head that copies a name from the notes then raises every variant of it from the first step,
    and pretraining only has to learn which variant a layout wants.
    """
    groups: dict[str, list[int]] = {}
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        word = token.removeprefix("\u0120")  # byte-level BPE writes a leading space as U+0120
        if word.isalpha() and len(word) > 1:
            groups.setdefault(word.lower(), []).append(token_id)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        for ids in groups.values():
            weight[ids[1:]] = weight[ids[0]].clone()


def _model_config(spec: EmbeddedBaseSpec) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,  # the embedding matrix is a large share of a tiny model
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        dtype="float32",
    )


def _encode(tokenizer: PreTrainedTokenizerFast, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """bos + prompt + target + eos, with labels on the target (and eos) only."""
    prompt_ids = tokenizer(prompt).input_ids
    target_ids = tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding needs no attention mask: under causal attention no real token sees a later pad.
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in examples])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in examples])
    return input_ids, labels


def _pretrain(model: LlamaForCausalLM, examples: list, spec: EmbeddedBaseSpec, pad_id: int) -> float:
    """AdamW with linear warmup and cosine decay; returns the mean loss of the last tenth of steps."""
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / (spec.pretrain_steps - spec.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches: list[list[int]] = []
    losses: list[float] = []
    model.train()
    for step in range(spec.pretrain_steps):
        if not batches:
            batches = _length_buckets(examples, spec.batch_size, generator)
        input_ids, labels = _batch([examples[i] for i in batches.pop()], pad_id)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, spec.pretrain_steps // 5) == 0:
            logger.info("[INCREMENTAL] Embedded base pretraining: step %d/%d, loss %.3f", step + 1, spec.pretrain_steps, losses[-1])
    tail = losses[-max(1, len(losses) // 10) :]
    return round(sum(tail) / len(tail), 4)


def _length_buckets(examples: list, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of shuffled batches whose members have similar lengths, so little compute goes to padding."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    pool = 8 * batch_size  # sort within pools of 8 batches: similar lengths, still random batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: len(examples[i][0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def _task_and_notes_of(prompt: str) -> tuple[str, str]:
    """Inverts `build_prompt` in `PRETRAIN_LAYOUT`."""
    header, rest = prompt.split("\n### Notes:\n", 1)
    return header.removeprefix("### Task: "), rest.rsplit("\n### Output:\n", 1)[0]


def _target_nlls(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, triples: Sequence[tuple[str, str, str]]) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each (task, notes, target) triple's target, eos included."""
    from incremental.scoring import score_nll  # the project's one scoring implementation

    tasks, notes, targets = zip(*triples)
    scores = score_nll(
        model, tokenizer, list(tasks), list(notes), list(targets),
        max_length=model.config.max_position_embeddings, prompt_layout=PRETRAIN_LAYOUT,
    )  # fmt: skip
    return [(float(nll), int(n)) for nll, n in zip(scores.nll_sum, scores.n_tokens)]


def _prompt_gain(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, triples: Sequence[tuple[str, str, str]]
) -> dict[str, dict[str, float]]:
    """Per task and over all ("all"): mean NLL per target token under its own notes ("own"), under
    another case's notes of the same task ("other"), and their difference ("gain")."""
    swapped = []
    for i, (task, _, target) in enumerate(triples):
        others = [triples[(i + k) % len(triples)] for k in range(1, len(triples))]
        other_notes = next((notes for t, notes, _ in others if t == task), others[0][1])
        swapped.append((task, other_notes, target))
    own, other = _target_nlls(model, tokenizer, triples), _target_nlls(model, tokenizer, swapped)
    report = {}
    for task in sorted({t for t, _, _ in triples}) + ["all"]:
        picked = [i for i, (t, _, _) in enumerate(triples) if task in (t, "all")]
        tokens = sum(own[i][1] for i in picked)
        mean_own = sum(own[i][0] for i in picked) / tokens
        mean_other = sum(other[i][0] for i in picked) / tokens
        report[task] = {"own": round(mean_own, 4), "other": round(mean_other, 4), "gain": round(mean_other - mean_own, 4)}
    return report
