"""Threads: one training step at 1 and at 2 torch threads, on idle cores and beside a busy process.

Why `INCREMENTAL_THREADS` defaults to the cores this process may use, and what oversubscription
costs. The workload is a training step: a random-init Llama of about 5M parameters, a batch of real
token ids (synthetic meeting notes and artifacts through the embedded base's tokenizer, cut into
full blocks), forward + backward + AdamW step, in float32 on the CPU. Four conditions, interleaved
(the order rotates each repeat), each measured as steps/s over a time window (at least one step):

- threads: `torch.set_num_threads(1)` or `(2)`;
- load: nothing else started, or one `python -c "while True: pass"` spinning beside it (same cores).

The machine's other work during each window (all cores' busy time from /proc/stat, minus this process
and the spinner) is reported, since a shared machine is never really idle. Medians of `--repeats`.
Writes its table into BENCHMARKS.md between the threads markers.

    .venv/bin/python benchmarks/threads.py [--repeats 5] [--window 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.report import write_block
from incremental.embedded import ensure_embedded_base
from incremental.settings import Settings
from incremental.synthetic import generate_cases
from incremental.threads import available_cores, cgroup_cpu_limit, own_cpu_max

BATCH, BLOCK = 4, 128
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def token_blocks(tokenizer, count: int) -> torch.Tensor:
    """`count` x BLOCK real token ids: synthetic notes and artifacts, encoded and concatenated."""
    stream: list[int] = []
    for case in generate_cases(200, seed=11):
        stream += tokenizer(case.notes).input_ids + tokenizer(case.artifact, add_special_tokens=False).input_ids
        stream.append(tokenizer.eos_token_id)
        if len(stream) >= count * BLOCK:
            break
    return torch.tensor(stream[: count * BLOCK]).view(count, BLOCK)


def model_for(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=688, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).train()


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat's first line."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure(model, optimizer, batch: torch.Tensor, threads: int, busy: bool, window: float) -> tuple[float, float]:
    """(steps/s, other work in cores) for one condition: a warm-up step, then steps for `window` seconds."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        torch.set_num_threads(threads)

        def step() -> None:
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # Warm-up without a whole step (one step at 2 threads beside load takes seconds): the thread pool
        # resized by a parallel op, the spinner given time to start. The model and optimizer are warm
        # from the conditions before.
        for _ in range(10):
            torch.ones(256, 256) @ torch.ones(256, 256)
        time.sleep(0.3 if busy else 0.0)
        pids = [os.getpid()] + ([spinner.pid] if spinner else [])
        ours0, (busy0, total0) = sum(process_seconds(p) for p in pids), cpu_jiffies()
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < window:
            step()
            steps += 1
        elapsed = time.perf_counter() - start
        ours1, (busy1, total1) = sum(process_seconds(p) for p in pids), cpu_jiffies()
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    cores = os.cpu_count() or 1
    machine_busy = (busy1 - busy0) / max(total1 - total0, 1) * cores  # in cores
    others = max(0.0, machine_busy - (ours1 - ours0) / elapsed)
    return steps / elapsed, others


def conclusion(median: dict[tuple[int, bool], float], idle_others: float, default: int) -> str:
    """What the table says, from its numbers: the thread ratios, and whether 'none started' was idle."""
    idle_ratio, busy_ratio = median[2, False] / median[1, False], median[2, True] / median[1, True]
    if idle_others < 0.25:
        idle = f"On idle cores 2 threads ran at {idle_ratio:.2f}x the speed of 1."
    else:
        idle = (
            f"The machine was not idle even with nothing started (other work took {idle_others:.2f} cores), "
            f"and there 2 threads already ran at {idle_ratio:.2f}x the speed of 1; the gain of 2 threads on "
            "truly idle cores is not measured by this run."
        )
    return (
        f"{idle} Beside the busy process 2 threads ran at {busy_ratio:.2f}x the speed of 1 "
        f"(1 thread kept {median[1, True] / median[1, False]:.2f}x of its speed with nothing started, "
        f"2 threads {median[2, True] / median[2, False]:.2f}x). torch's intra-op threads wait for each other "
        "at the end of every parallel operator, so one descheduled thread stalls the whole step: threads must "
        "not outnumber the cores the process actually gets. Hence the default: the cores the process *may* "
        f"use, its CPU affinity capped by its cgroup CPU quota ({default} here). torch alone follows the "
        "affinity but not a quota (`docker --cpus`, a Kubernetes CPU limit), where it starts one thread per "
        "host core, the oversubscription measured above. A process that shares its cores with other work "
        "should be given cores of its own (`taskset`, a container's CPU limit, a work pool's job resources) "
        "or a lower `INCREMENTAL_THREADS`."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=float, default=5.0, help="seconds of steps per measurement")
    parser.add_argument("--no-write", action="store_true", help="print the table without writing BENCHMARKS.md")
    args = parser.parse_args()
    began = time.perf_counter()
    load_before = os.getloadavg()[0]

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_base(Settings().embedded_cache_dir))
    model = model_for(len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = token_blocks(tokenizer, BATCH)
    parameters = sum(p.numel() for p in model.parameters())

    conditions = [(threads, busy) for busy in (False, True) for threads in (1, 2)]
    rates: dict[tuple[int, bool], list[float]] = {c: [] for c in conditions}
    others: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats):
        shift = repeat % len(conditions)
        for threads, busy in conditions[shift:] + conditions[:shift]:
            rate, other = measure(model, optimizer, batch, threads, busy, args.window)
            rates[threads, busy].append(rate)
            others[busy].append(other)
            print(f"repeat {repeat + 1}: {threads} thread(s), {'busy' if busy else 'idle'}: {rate:.2f} steps/s, other work {other:.2f} cores", flush=True)

    median = {c: statistics.median(v) for c, v in rates.items()}
    quota = cgroup_cpu_limit(own_cpu_max())
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    rows = [
        "| load beside the step | 1 thread (steps/s) | 2 threads (steps/s) | 2 threads / 1 thread | other work on the machine (cores, median) |",
        "|---|---|---|---|---|",
    ]
    for busy, label in ((False, "none started"), (True, "one busy process (`python -c \"while True: pass\"`)")):
        one, two = median[1, busy], median[2, busy]
        rows.append(f"| {label} | {one:.2f} | {two:.2f} | {two / one:.2f}x | {statistics.median(others[busy]):.2f} |")
    text = "\n".join(
        [
            "## Threads: a training step at 1 and 2 torch threads, on idle cores and beside a busy process",
            "",
            f"Command: `.venv/bin/python benchmarks/threads.py --repeats {args.repeats} --window {args.window:g}`  ",
            (
                f"Machine: {cpu_model}, {os.cpu_count()} cores ({available_cores()} available to the process: affinity "
                f"{len(os.sched_getaffinity(0))}, cgroup quota {'none' if quota is None else f'{quota:g} cores'}), "
                f"torch {torch.__version__}, Python {platform.python_version()}; load average {load_before:.1f} "
                f"before, {os.getloadavg()[0]:.1f} after; {time.perf_counter() - began:.0f} s in all.  "
            ),
            (
                f"Workload: one training step (forward, backward, AdamW) of a random-init Llama, {parameters / 1e6:.1f}M "
                f"parameters, float32, on a batch of {BATCH} x {BLOCK} real token ids; steps/s over {args.window:g} s "
                f"windows (at least one step), the four conditions interleaved (order rotated each repeat), medians of "
                f"{args.repeats}. Other work: the machine's busy cores (/proc/stat) minus this process and the spinner."
            ),
            "",
            *rows,
            "",
            conclusion(median, statistics.median(others[False]), available_cores()),
        ]
    )
    print(text)
    if not args.no_write:
        write_block("threads", text)


if __name__ == "__main__":
    main()
