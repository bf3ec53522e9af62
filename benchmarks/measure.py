"""Measurement helpers shared by the benchmarks: timing, peak memory, machine rates, output.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (the caching allocator's live bytes); on
CPU the torch profiler's allocation events (``profile_memory=True``): the maximum of the running
sum of the bytes that torch allocates and frees during the call, in time order. Neither
counts memory that is not a torch tensor (Python objects, the CPU allocator's cache).
"""
import json
import os
import statistics
import sys
import time

import torch

DEFAULT_PEAK_FLOPS = {"cuda": 790e12}  # H100 bf16 dense, measured (../shared/specs/perf_anchors.md)


def arguments(doc: str, presets, warmup: int = 2, repeats: int = 5):
    """The parser of a per-preset benchmark: --device, --preset, --warmup, --repeats, --json."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--preset", choices=sorted(presets), default="cpu-tiny")
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--json", help="write the figures here")
    return ap


def device_of(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmark: error: --device cuda but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup: int, repeats: int):
    """(median wall seconds, median process CPU seconds) of ``fn()``, after ``warmup`` calls.

    On a shared CPU the process time (all threads of this process) is the figure that other
    processes disturb least; on CUDA only the wall time means anything."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def peak_extra_bytes(fn, device) -> int:
    """Peak bytes allocated by torch during ``fn()`` on top of what was live before it."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _peak_of_allocations(_allocation_events(prof))


def profile_table(fn, device, repeats: int, path: str, rows: int = 40) -> str:
    """torch.profiler's operator table of ``repeats`` calls of ``fn()``, by self time on the device
    (CUDA) or on the CPU, written to ``path`` and returned."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{repeats} calls, sorted by {key}\n{table}\n")
    return table


def _allocation_events(prof):
    """(time ns, +-bytes) of every CPU allocation and free the profiler saw, in time order."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    return sorted(
        (e.start_time_ns, e.extra_fields.alloc_size)
        for e in walk(tree)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"
    )


def _peak_of_allocations(events) -> int:
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated",
    "cpu": "torch profiler allocation events (profile_memory=True)",
}


def matmul_rate(device, dtype=torch.float32, n: int = 1024, repeats: int = 5, wall_clock: bool = False) -> float:
    """Measured rate of an n x n x n matmul: FLOP per wall second on CUDA, FLOP per process CPU
    second on CPU (the CPU's MFU denominator, against the step's FLOP per CPU second), or per wall
    second there too with ``wall_clock`` (a floor to compare a wall time with)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    wall, cpu = time_call(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * n ** 3 / (cpu if device.type == "cpu" and not wall_clock else wall)


def copy_bandwidth(device, nbytes: int, repeats: int = 5) -> float:
    """Measured bytes/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    seconds, _ = time_call(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * src.numel() * 4 / seconds


def markdown_table(rows, columns) -> str:
    """``rows``: list of dicts; ``columns``: list of (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else (fmt.format(value) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, data: dict):
    if not path:
        return
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)  # never a half-written file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def environment(device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


GiB = 1024 ** 3
MiB = 1024 ** 2
