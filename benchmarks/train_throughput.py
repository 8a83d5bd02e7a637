"""Training throughput: this project's trainer in each batching mode against a plain `transformers.Trainer`
+ PEFT, same model, rows and seed.

Arms (CPU): B, the baseline: `Trainer` with its default random sampler and `DataCollatorForSeq2Seq` padding
to the longest row of each batch (dynamic padding), the same hyperparameters. Then
`incremental.training.train_adapter` on a dataset from `incremental.dataset.tokenize_train`, once per
`TrainSettings.batching` mode (padded, length_grouped, token_budget, flattened), plus flattened_sdpa_mask:
flattened rows on transformers' SDPA (a block-diagonal mask over the whole row) instead of attention per
example, the way flattening runs without a variable-length kernel. Every arm counts what its batches
hold with the same `throughput.CountingCollator` (it only observes) and reports real (non-padding)
tokens/s over `Trainer.train`, padding per real token, MFU against the device's measured peak
(`throughput.measured_peak`, measured once per run of this script), the Trainer's mean train loss, a
held-out per-token NLL after training (batching must not hurt learning), and peak memory.

CPU (the default): a random-init Llama of ~13M parameters (hidden 512, 4 layers, the embedded base's
BPE tokenizer, vocabulary 1024), LoRA r=16 on every projection, synthetic meeting-note rows
(`synthetic.generate_cases`, 43-264 tokens). Each arm runs in a process of its own (so peak RSS is
the arm's); within a pair every arm trains with the same seed (data order), in a rotating order (each
pair starts one arm later, so no arm always runs first or last), and pair k uses seed k: the held-out
NLL is compared across several data orders. Writes its table into BENCHMARKS.md (train_throughput).

GPU (`--gpu`): a 7B-shaped Llama (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocabulary
32000) with random weights, its projections quantized in place to 4-bit NF4 with bitsandbytes (no
download, no checkpoint on disk), prepared as the project prepares a QLoRA base on CUDA (float32
non-quantized weights, activation checkpointing), LoRA r=16 on every projection, rows of 1-3 joined
cases (up to 512 tokens). Arms A (`train_adapter`, batching "auto") and B (the baseline). One process:
the base is built once and each arm gets a fresh adapter from the same seed; the table is printed
beside published anchors and written into BENCHMARKS.md (train_throughput_gpu). This path imports
torch, transformers, peft, bitsandbytes, accelerate, tokenizers, filelock and pydantic, plus
`incremental.{training,batching,throughput,config,manifest,layout,embedded,synthetic,prompting,errors}`:
not DuckDB, Prefect, pydantic-settings or `datasets` (the Trainer imports `datasets` only where it is
installed). `--dry-run-cpu` runs the same path on the CPU with a 2-layer, hidden-256 shape, a few
steps, to check it before a GPU is at hand.

    .venv/bin/python benchmarks/train_throughput.py [--pairs 3] [--rows 192] [--threads 1] [--arms B,token_budget,...]
    python3 benchmarks/train_throughput.py --gpu [--layers 32] [--steps 32] [--pairs 2]
    .venv/bin/python benchmarks/train_throughput.py --gpu --dry-run-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from incremental.config import LLAMA_PROJECTIONS, TrainSettings  # noqa: E402
from incremental.throughput import CountingCollator, LoraFlops, measure_matmul_peak, measured_peak, mfu, peak_key  # noqa: E402

SEED = 0
LORA_R, LORA_ALPHA = 16, 32
CPU_SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1376)
GPU_SHAPE = dict(
    vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=11008,
)  # fmt: skip
DRY_SHAPE = dict(GPU_SHAPE, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=768)
ARMS = {"A": "this project: `train_adapter`, batching auto", "B": "plain `Trainer` + PEFT, random batches"}
CPU_ARMS = {
    "B": "baseline: plain `Trainer` + PEFT, random batches, dynamic padding",
    "padded": "`train_adapter`, padded: random batches, dynamic padding",
    "length_grouped": "`train_adapter`, length_grouped: transformers' `LengthGroupedSampler`",
    "token_budget": "`train_adapter`, token_budget: length-sorted batches within a token budget, random order",
    "flattened": "`train_adapter`, flattened: random batches in one row, attention per example",
    "flattened_sdpa_mask": "`train_adapter`, flattened on SDPA with a block-diagonal mask over the row",
}
# Published single-GPU anchors (../shared/reference/performance.md, section 0): LLaMA-Factory wiki
# "Performance comparison", Llama-2-7B, r=8 on all modules, batch 4 x accumulation 2, max length 1024.
ANCHORS = (
    ("HF Trainer QLoRA 4-bit, Llama-2-7B, A100-40GB (LLaMA-Factory wiki)", 2415),
    ("Unsloth QLoRA 4-bit, same setup", 3726),
    ("HF Trainer LoRA bf16, same setup", 2392),
    ("HF + FlashAttention-2 LoRA bf16, same setup", 2954),
)


# -- data and model, shared by both modes -----------------------------------------------------------


def make_tokenizer():
    """The embedded base's byte-level BPE (vocabulary 1024), trained in-process on synthetic notes: no hub."""
    from incremental.embedded import EmbeddedBaseSpec, _train_tokenizer

    return _train_tokenizer(EmbeddedBaseSpec())


def case_texts(n: int, seed: int, join: int = 1) -> list[tuple[str, str, str]]:
    """(artifact type, notes, artifact) of synthetic cases; `join` > 1 glues 1..join cases per row
    (a seeded draw) into one longer row."""
    import random

    from incremental.synthetic import generate_cases

    cases = generate_cases(n * join, seed)
    if join == 1:
        return [(c.artifact_type, c.notes, c.artifact) for c in cases]
    draw, rows, at = random.Random(seed), [], 0
    for _ in range(n):
        k = draw.randint(1, join)
        part = cases[at : at + k]
        at += k
        rows.append((part[0].artifact_type, "\n\n".join(c.notes for c in part), "\n\n".join(c.artifact for c in part)))
    return rows


def build_model(shape: dict, vocab_size: int, device: str, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{"vocab_size": vocab_size, **shape}, tie_word_embeddings=False, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip
    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False  # as incremental.modeling.load_base: training never reuses a KV cache
    return model


def with_fresh_adapter(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEED)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_arm(arm: str, model, tokenizer, rows, settings: TrainSettings, device: str, peak_cache: Path, out_dir: Path) -> dict:
    """Train `model`'s adapter with arm B (plain Trainer) or the project's trainer: A (its batching "auto"), a
    batching mode, or flattened_sdpa_mask; the figures every arm reports."""
    if arm != "B":
        import incremental.training as training

        if arm == "flattened_sdpa_mask":  # flattened rows, the model's own SDPA: no attention per example
            import dataclasses

            from incremental.batching import plan_batching

            training.plan_batching = lambda *a, **k: dataclasses.replace(plan_batching(*a, **k), attention=None)
        if arm != "A":
            settings = settings.model_copy(update={"batching": "flattened" if arm == "flattened_sdpa_mask" else arm})
        result = training.train_adapter(
            model, tokenizer, rows, settings, out_dir, device=device, show_progress_bar=False, peak_cache=peak_cache
        )
        return {
            "tokens_per_s": result.tokens_per_second, "pad_per_real": result.pad_per_real_token, "mfu": result.mfu,
            "train_loss": result.train_loss, "steps": result.steps, "real_tokens": result.real_tokens,
            "train_s": result.train_seconds, "peak_flops": result.peak_flops, "batching": result.batching,
        }  # fmt: skip
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    flops_model = LoraFlops.of(model)
    peak = measured_peak(device, peak_cache)
    counting = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True))
    with tempfile.TemporaryDirectory(prefix="plain-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, report_to="none", save_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.gradient_accumulation_steps,
            learning_rate=settings.learning_rate, num_train_epochs=settings.epochs, warmup_steps=settings.warmup_ratio,
            lr_scheduler_type="linear", weight_decay=settings.weight_decay, seed=settings.seed, data_seed=settings.seed,
            use_cpu=device == "cpu", bf16=device == "cuda", dataloader_num_workers=0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=counting)
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    tally = counting.tally
    return {
        "tokens_per_s": tally.tokens / seconds, "pad_per_real": tally.pad_per_real_token,
        "mfu": mfu(flops_model.total(tally.tokens, tally.attended_pairs), seconds, peak), "train_loss": output.training_loss,
        "steps": output.global_step, "real_tokens": tally.tokens, "train_s": seconds, "peak_flops": peak,
    }  # fmt: skip


def heldout_nll(model, rows: list[dict], device: str) -> float:
    """Per-token NLL of the target tokens of `rows`, each scored alone (no padding), after training.

    Left in train mode (no dropout anywhere here, so the same function): in eval mode bitsandbytes
    repacks 4-bit weights for its CPU kernels in place, which the next arm would then train on."""
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([row["labels"]], device=device)
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def plausible(figures: dict) -> None:
    if not (figures["tokens_per_s"] > 0 and 0 <= figures["pad_per_real"] and 0 < figures["mfu"] < 1.5):
        raise SystemExit(f"implausible figures: {figures}")


# -- CPU: one process per arm ------------------------------------------------------------------------


def cpu_child(workdir: Path, arm: str, threads: int, seed: int) -> None:
    import datasets
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    train = datasets.load_from_disk(str(workdir / "train"))
    heldout = json.loads((workdir / "heldout.json").read_text())
    settings = TrainSettings.model_validate_json((workdir / "settings.json").read_text()).model_copy(update={"seed": seed})
    model = with_fresh_adapter(build_model(CPU_SHAPE, len(tokenizer), "cpu"))
    cpu_started = time.process_time()
    figures = train_arm(arm, model, tokenizer, train, settings, "cpu", workdir / "peak.json", workdir / f"adapter-{arm}")
    # CPU seconds of the whole arm call (Trainer set-up and, for the project's arms, saving the adapter
    # included: tens of milliseconds): less sensitive than wall time to this process being descheduled.
    figures["tokens_per_cpu_s"] = figures["real_tokens"] / (time.process_time() - cpu_started)
    figures["heldout_nll"] = heldout_nll(model, heldout, "cpu")
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["params"] = sum(p.numel() for p in model.parameters())
    figures["vocab"] = len(tokenizer)
    figures["flops"] = LoraFlops.of(model).__dict__
    print("RESULT " + json.dumps(figures))


def cpu_main(args) -> None:
    from incremental.batching import CPU_DEFAULT
    from incremental.dataset import encode_examples, tokenize_train
    from incremental.prompting import LATEST_LAYOUT

    import pyarrow as pa

    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(work / "tokenizer")
    texts = case_texts(args.rows, seed=11)
    table = pa.table({"artifact_type": [t for t, _, _ in texts], "prompt": [n for _, n, _ in texts], "target": [a for _, _, a in texts]})
    train, _ = tokenize_train(table, tokenizer, args.max_length, prompt_layout=LATEST_LAYOUT)
    train.save_to_disk(str(work / "train"))
    held = case_texts(args.heldout, seed=99)
    encoded = encode_examples(tokenizer, *zip(*held), args.max_length, prompt_layout=LATEST_LAYOUT)
    (work / "heldout.json").write_text(json.dumps([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]))
    settings = TrainSettings(epochs=1, batch_size=args.batch_size, max_length=args.max_length, seed=SEED)
    (work / "settings.json").write_text(settings.model_dump_json())
    # The peak once, before any arm, at the arms' thread count: every arm divides by the same number.
    torch.set_num_threads(args.threads)
    peak = measured_peak("cpu", work / "peak.json", measure=lambda device: measure_matmul_peak(device, trials=10))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    arms = args.arms
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for pair in range(args.pairs):
        order = arms[pair % len(arms) :] + arms[: pair % len(arms)]  # each pair starts one arm later
        for arm in order:
            run = subprocess.run(
                [sys.executable, __file__, "--child", arm, "--workdir", str(work), "--threads", str(args.threads),
                 "--seed", str(SEED + pair)],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if run.returncode or line is None:
                raise SystemExit(f"arm {arm} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
            figures = json.loads(line[len("RESULT ") :])
            plausible(figures)
            results[arm].append(figures)
            print(f"pair {pair + 1} arm {arm}: {figures['tokens_per_s']:.0f} real tokens/s ({figures['tokens_per_cpu_s']:.0f} per CPU-s), "
                  f"pad {figures['pad_per_real']:.3f}, MFU {100 * figures['mfu']:.1f}%, loss {figures['train_loss']:.4f}, "
                  f"held-out NLL {figures['heldout_nll']:.4f}", flush=True)  # fmt: skip
    lengths = [len(ids) for ids in train["input_ids"]]
    machine = (
        f"{platform_cpu()}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, torch "
        f"{torch.__version__}; shared with other agents' work (load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after: timings are noisy, read the medians and the ratios)"
    )
    text = cpu_report(args, results, peak, lengths, machine, time.perf_counter() - began, CPU_DEFAULT)
    print(text)
    if args.write:
        from benchmarks.report import write_block

        write_block("train_throughput", text)


def cpu_report(args, results: dict, peak: float, lengths: list[int], machine: str, seconds: float, cpu_default: str) -> str:
    base = results["B"]
    mean_len = statistics.mean(lengths)
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    paired = lambda runs, key, f: statistics.median(f(x[key], y[key]) for x, y in zip(runs, base))  # noqa: E731
    rows, ratios = [], {}
    for arm, runs in results.items():
        each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
        if arm == "B":
            ratio = cpu_ratio = nll_change = "(baseline)"
        else:
            pair_ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs, base)]
            ratios[arm] = pair_ratios
            ratio = f"**{statistics.median(pair_ratios):.2f}x** ({', '.join(f'{r:.2f}' for r in pair_ratios)})"
            cpu_ratio = f"{paired(runs, 'tokens_per_cpu_s', lambda x, y: x / y):.2f}x"
            nll_change = f"{round(paired(runs, 'heldout_nll', lambda x, y: x - y), 4) + 0.0:+.4f}"  # + 0.0: no "-0.0000"
        default = " (auto on CPU)" if arm == cpu_default else ""
        rows.append(
            f"| {arm}{default}: {CPU_ARMS[arm]} | {each} | **{med(runs, 'tokens_per_s'):.0f}** | {ratio} | {cpu_ratio} | "
            f"{med(runs, 'pad_per_real'):.3f} | {100 * med(runs, 'mfu'):.1f} % | {med(runs, 'train_loss'):.4f} | "
            f"{med(runs, 'heldout_nll'):.4f} | {nll_change} | {med(runs, 'train_s'):.1f} | {med(runs, 'peak_rss_mb'):.0f} MB |"
        )
    first = next(iter(results.values()))[0]
    flops = LoraFlops(**first["flops"])
    steps = ", ".join(f"{arm} {runs[0]['steps']}" for arm, runs in results.items())
    arms = ",".join(results)
    return "\n".join([
        "## Training throughput: this project's trainer in each batching mode against a plain Trainer + PEFT (CPU)",
        "",
        f"Command: `.venv/bin/python benchmarks/train_throughput.py --pairs {args.pairs} --rows {args.rows} --threads {args.threads} "
        f"--arms {arms}`  ",
        f"Machine: {machine}. {seconds:.0f} s in all.  ",
        f"Setup: random-init Llama, {first['params'] / 1e6:.1f}M parameters (hidden {CPU_SHAPE['hidden_size']}, "
        f"{CPU_SHAPE['num_hidden_layers']} layers, {CPU_SHAPE['num_attention_heads']} heads, intermediate "
        f"{CPU_SHAPE['intermediate_size']}, vocabulary {first['vocab']}), float32, SDPA, LoRA r={LORA_R} "
        f"on every projection ({flops.trainable_params:,} trainable); {args.rows} synthetic rows "
        f"(`generate_cases`, {min(lengths)}-{max(lengths)} tokens, mean {mean_len:.0f}) through `tokenize_train`, batch "
        f"{args.batch_size} (token_budget: {args.batch_size} x the mean length, {args.batch_size * round(mean_len)} tokens), "
        f"1 epoch (steps: {steps}), learning rate 2e-3; {args.threads} torch thread(s) for every arm. Each arm in a process "
        f"of its own; {args.pairs} rounds, each with every arm in a rotating order and one seed (data order) for all "
        f"arms, seed k in round k. Throughput over `Trainer.train` (model build and data load excluded). Held-out NLL: "
        f"per-token target NLL of {args.heldout} unseen rows, each scored alone, after training.",
        "",
        "| arm | real tokens/s (each round) | median | real tokens/s / B's, median of rounds (each) | by CPU time | "
        "pad tokens per real token | MFU | train loss (Trainer mean) | held-out NLL | held-out NLL - B's, median of rounds | "
        "train s | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Target: real tokens/s >= 1.5x the baseline's, without a worse held-out NLL. With no padding at all, padding alone "
        f"would explain {1 + med(base, 'pad_per_real'):.2f}x (1 + B's pad tokens per real token).  ",
        f"MFU against a measured peak of {peak / 1e9:.1f} GFLOP/s ({peak_key_note(args.threads)}: the fastest of 10 timed "
        f"2048² float32 products, measured once before the arms). Model FLOPs per real token (throughput.LoraFlops): "
        f"4 x {flops.frozen_params:,} frozen + 6 x {flops.trainable_params:,} trainable + causal attention 12 x "
        f"{flops.layers} layers x {flops.attention_width} x (T+1)/2 = {flops.per_token(mean_len) / 1e6:.1f} MFLOP at the "
        f"mean length T = {mean_len:.0f}; a flattened row's attention counts the pairs within each example.",
    ])


def peak_key_note(threads: int) -> str:
    return f"float32, {threads} thread{'s' if threads > 1 else ''}"


def platform_cpu() -> str:
    return peak_key("cpu").split(" | ")[0]


# -- GPU: one process, the 4-bit base built once -----------------------------------------------------


def quantize_projections(model, device: str, compute_dtype: torch.dtype) -> None:
    """Replace every decoder-layer `nn.Linear` with a bitsandbytes 4-bit NF4 layer (double quantization,
    as `incremental.modeling.load_base`), quantizing its current (random) weight on `device`; then mark
    the model as a 4-bit one, as `from_pretrained(quantization_config=...)` does, for PEFT and the Trainer."""
    import bitsandbytes as bnb
    from transformers.utils.quantization_config import QuantizationMethod

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                quantized = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                    compress_statistics=True, quant_type="nf4", device="meta",
                )  # fmt: skip
                quantized.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=quantized
                )
                quantized.weight.to(device)  # quantizes in place
                if child.bias is not None:
                    quantized.bias = child.bias
                setattr(parent, name, quantized)  # the full-precision weight goes with `child`
    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    if device == "cuda":
        torch.cuda.empty_cache()


def gpu_rows(tokenizer, n: int, seed: int, max_length: int) -> list[dict]:
    """Rows of 1-3 joined cases: bos + notes + artifact + eos, the notes masked from the loss, the artifact
    cut to fit. Not `incremental.dataset.encode_examples`: that module imports the feedback store
    (DuckDB), which the GPU machine lacks; the tokens differ only at the notes/artifact seam."""
    rows = []
    for _, notes, artifact in case_texts(n, seed, join=3):
        prompt = tokenizer(notes + "\n\n").input_ids  # bos + notes
        target = tokenizer(artifact, add_special_tokens=False).input_ids[: max(8, max_length - len(prompt) - 1)]
        ids = (prompt + target + [tokenizer.eos_token_id])[-max_length:]
        labels = ([-100] * len(prompt) + target + [tokenizer.eos_token_id])[-max_length:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def gpu_main(args) -> None:
    import importlib.metadata as metadata

    from peft import prepare_model_for_kbit_training

    began = time.perf_counter()
    dry = args.dry_run_cpu
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA; use --gpu --dry-run-cpu to check the path on a CPU")
    shape = dict(DRY_SHAPE if dry else GPU_SHAPE)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    batch, max_length = (4, 128) if dry else (args.batch_size, args.max_length)
    steps = 2 if dry else args.steps
    pairs = 1 if dry else args.pairs
    work = Path(tempfile.mkdtemp(prefix="train-throughput-gpu-"))
    tokenizer = make_tokenizer()
    train_rows = gpu_rows(tokenizer, steps * batch, seed=11, max_length=max_length)
    heldout = gpu_rows(tokenizer, 4 if dry else 16, seed=99, max_length=max_length)
    settings = TrainSettings(epochs=1, batch_size=batch, max_length=max_length, seed=SEED)
    peak = measured_peak(device, work / "peak.json")  # once, before the model takes the GPU's memory
    built = time.perf_counter()
    compute = torch.float32 if dry else torch.bfloat16
    base = build_model(shape, shape["vocab_size"], device, dtype=compute)
    quantize_projections(base, device, compute)
    # As incremental.modeling.attach_trainable_adapter prepares a 4-bit base on CUDA.
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable  # renamed in transformers 5.2x
    enable(**({"activation_checkpointing_kwargs": {"use_reentrant": False}} if enable.__name__.startswith("activation") else
              {"gradient_checkpointing_kwargs": {"use_reentrant": False}}))  # fmt: skip
    build_s = time.perf_counter() - built
    # Warm-up, untimed: two steps of a Trainer run (CUDA context, cuBLAS handles, bitsandbytes and
    # optimizer kernels, accelerate's state), so that no arm pays first-use costs the others do not.
    model = with_fresh_adapter(base)
    flops = LoraFlops.of(model)
    train_arm("B", model, tokenizer, train_rows[: 2 * batch], settings, device, work / "peak.json", work / "warm-up")
    base = model.unload()
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for pair in range(pairs):
        for arm in ("AB" if pair % 2 == 0 else "BA"):
            model = with_fresh_adapter(base)
            if not dry:
                torch.cuda.reset_peak_memory_stats()
            figures = train_arm(arm, model, tokenizer, train_rows, settings, device, work / "peak.json", work / f"adapter-{arm}")
            figures["heldout_nll"] = heldout_nll(model, heldout, device)
            figures["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30 if not dry else 0.0
            plausible(figures)
            results[arm].append(figures)
            print(f"pair {pair + 1} arm {arm}: {figures['tokens_per_s']:.0f} real tokens/s, pad {figures['pad_per_real']:.3f}, "
                  f"MFU {100 * figures['mfu']:.1f}%, loss {figures['train_loss']:.4f}", flush=True)  # fmt: skip
            base = model.unload()
    heavy = [name for name in ("duckdb", "prefect", "pydantic_settings") if name in sys.modules]
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "?"
    device_name = torch.cuda.get_device_name() if not dry else f"CPU dry run ({platform_cpu()})"
    lengths = [len(r["input_ids"]) for r in train_rows]
    text = gpu_report(args, results, peak, flops, shape, batch, lengths, device_name, versions, heavy, build_s, time.perf_counter() - began, dry)
    print(text)
    if args.write and not dry:
        from benchmarks.report import write_block

        write_block("train_throughput_gpu", text)


def gpu_report(args, results, peak, flops, shape, batch, lengths, device_name, versions, heavy, build_s, seconds, dry) -> str:
    a, b = results["A"], results["B"]
    ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, b)]
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    mean_len = statistics.mean(lengths)
    each = lambda runs: ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)  # noqa: E731
    rows = [
        f"| {arm}: {ARMS[arm]} | {each(runs)} | **{med(runs, 'tokens_per_s'):,.0f}** | "
        f"{med(runs, 'pad_per_real'):.3f} | {100 * med(runs, 'mfu'):.1f} % | {med(runs, 'train_loss'):.4f} | "
        f"{med(runs, 'heldout_nll'):.4f} | {med(runs, 'train_s'):.1f} | {med(runs, 'peak_gpu_gb'):.1f} GB |"
        for arm, runs in (("A", a), ("B", b))
    ]
    anchors = [f"| {name} | | {tok:,} | | | | | | |" for name, tok in ANCHORS]
    layers = shape["num_hidden_layers"]
    shape_note = "7B-shaped Llama (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocabulary 32000)"
    if dry:
        shape_note = f"DRY RUN on CPU: hidden {shape['hidden_size']}, {layers} layers (the GPU path's code, not its numbers)"
    elif layers != 32:
        shape_note = f"7B-shaped Llama cut to {layers} of 32 layers (hidden 4096, 32 heads, intermediate 11008, vocabulary 32000)"
    command = "python3 benchmarks/train_throughput.py --gpu" + (f" --layers {args.layers}" if args.layers else "") + (
        f" --steps {args.steps} --pairs {args.pairs}" if not dry else " --dry-run-cpu")
    return "\n".join([
        "## Training throughput on a GPU: QLoRA on a 7B-shaped Llama, this project's trainer against a plain Trainer + PEFT",
        "",
        f"Command: `{command}`  ",
        f"Machine: {device_name}; torch {versions['torch']}, transformers {versions['transformers']}, peft {versions['peft']}, "
        f"bitsandbytes {versions['bitsandbytes']}, accelerate {versions['accelerate']}. {seconds:.0f} s in all (base built "
        f"and quantized in {build_s:.0f} s). Of DuckDB, Prefect and pydantic-settings this process imported: {', '.join(heavy) or 'none'}.  ",
        f"Setup: {shape_note}, random weights, projections in 4-bit NF4 (double quantization, "
        f"{'float32' if dry else 'bfloat16'} compute), activation "
        f"checkpointing, LoRA r={LORA_R} alpha {LORA_ALPHA} on every projection ({flops.trainable_params:,} trainable); "
        f"{len(lengths)} rows of 1-3 joined synthetic cases ({min(lengths)}-{max(lengths)} tokens, mean {mean_len:.0f}), batch "
        f"{batch}, 1 epoch ({a[0]['steps']} steps){'' if dry else ', bf16 autocast'}; one process, the same base for every arm, a fresh adapter from seed {SEED} each, ABBA order, "
        f"{len(a)} pair(s), after an untimed two-step warm-up run.",
        "",
        "| arm | real tokens/s (each run) | median | pad tokens per real token | MFU | train loss | held-out NLL | train s | peak GPU memory |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        *anchors,
        "",
        f"Real tokens/s, A / B, median of pair ratios: **{statistics.median(ratios):.2f}x** "
        f"(pairs {', '.join(f'{r:.2f}' for r in ratios)}).  ",
        f"MFU against a measured peak of {peak / 1e12:.1f} TFLOP/s (the fastest of 5 timings of ten 8192² bfloat16 products"
        f"{'; float32 on this CPU in a dry run' if dry else ''}); model FLOPs per real token "
        f"{flops.per_token(mean_len) / 1e9:.2f} GFLOP at the mean length (4 x {flops.frozen_params:,} frozen + 6 x "
        f"{flops.trainable_params:,} trainable + causal attention). The anchors are published A100-40GB figures "
        "(r=8, batch 4 x 2, length 1024; ../shared/reference/performance.md): an H100's bfloat16 peak is about 3x an "
        "A100's, and QLoRA's dequantization and recompute are work MFU does not count.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="CPU: rounds of every arm (default 3); GPU: ABBA pairs (default 2)")
    parser.add_argument("--rows", type=int, default=192, help="CPU: synthetic train rows (one epoch)")
    parser.add_argument("--heldout", type=int, default=32, help="CPU: held-out rows scored after training")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="CPU default 512 (rows stay under 300), GPU 512")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads of every arm (and of the peak)")
    parser.add_argument("--gpu", action="store_true", help="QLoRA on a 7B-shaped Llama on CUDA")
    parser.add_argument("--layers", type=int, default=None, help="GPU: decoder layers (default 32)")
    parser.add_argument("--steps", type=int, default=32, help="GPU: optimizer steps per arm")
    parser.add_argument("--dry-run-cpu", action="store_true", help="with --gpu: the GPU path on the CPU, tiny shape")
    parser.add_argument("--no-write", dest="write", action="store_false", help="print the table only (not into BENCHMARKS.md)")
    parser.add_argument(
        "--arms", default=",".join(CPU_ARMS),
        help=f"CPU: comma-separated arms, B (the baseline) first (default: all: {', '.join(CPU_ARMS)})",
    )  # fmt: skip
    parser.add_argument("--child", choices=tuple(CPU_ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_length = args.max_length or 512
    args.arms = args.arms.split(",")
    if args.arms[0] != "B" or not set(args.arms) <= set(CPU_ARMS):
        parser.error(f"--arms: B first, then any of {', '.join(a for a in CPU_ARMS if a != 'B')}; got {','.join(args.arms)}")
    if args.child:
        cpu_child(args.workdir, args.child, args.threads, args.seed)
    elif args.gpu:
        args.pairs = args.pairs or 2
        gpu_main(args)
    else:
        args.pairs = args.pairs or 3
        cpu_main(args)


if __name__ == "__main__":
    main()
