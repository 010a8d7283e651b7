"""Hashing-core benchmark: our DCC and mAP against the reference formulations, same inputs, one run.

1. DCC at the CIFAR-10 incremental scale (n = 17,700 learned codes = classes 7..9 of a 59,000-item
   database sorted by class, m = 2,000 items sampled from the whole database, c = 48, single-label
   10 classes, soft similarity with r over the whole database, gamma = 200) against the reference
   formulation: dense float S (m x n), P = c S^T U + gamma Ubar, then per bit torch.cat the other
   columns and evaluate (B' U'^T) u. The new codes must be identical.
2. DCC at the NUS-WIDE scale (n = 195,834, 21 tags, multi-label, m = 2,000, c = 48): time and peak
   memory. On CPU the peak is the growth of the peak resident set size (VmHWM, reset through
   /proc/self/clear_refs) over the resident size just before the call, measured in a fresh child
   process so that no freed memory of earlier steps hides anything; on CUDA it is
   torch.cuda.max_memory_allocated over the memory allocated before the call.
3. mAP@ALL at 1,000 queries x 59,000 database items x 48 bits against the reference per-query loop
   (for each query: Hamming distances, stable argsort, gather the relevance, cumulative sum, AP).
   The values must agree to 1e-12.

    python tests/bench/bench_core.py [--device cpu|cuda] [--repeats 3] [--skip-nus] [--threads N]

Timings are wall-clock; "ours" is the median of --repeats runs, the reference runs once.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import sys
from pathlib import Path

import torch
from benchkit import table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the dense oracles
import oracles  # noqa: E402

from dihn_dist.method import dcc  # noqa: E402
from dihn_dist.method import hashing as H  # noqa: E402
from dihn_dist.method import metrics as M  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-nus", action="store_true", help="skip the NUS-WIDE scale DCC")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=1):
    """(result of the last call, median seconds)."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# 1. DCC, CIFAR-10 incremental scale

def reference_dcc(B, U, sample_labels, db_labels, sample_pos, gamma, r):
    """The reference formulation (dense S, per bit torch.cat then (B' U'^T) u: an n x m temporary per bit)."""
    code_length = B.shape[1]
    S = oracles.similarity(sample_labels, db_labels, r)  # dense m x n float
    ubar = torch.zeros(B.shape[0], code_length, device=U.device)
    inside = sample_pos >= 0
    ubar[sample_pos[inside]] = U[inside]
    P = code_length * S.T @ U + gamma * ubar
    B = B.clone().float()
    for k in range(code_length):
        B_rest = torch.cat([B[:, :k], B[:, k + 1:]], dim=1)
        U_rest = torch.cat([U[:, :k], U[:, k + 1:]], dim=1)
        values = P[:, k] - (B_rest @ U_rest.T) @ U[:, k]
        B[:, k] = torch.where(values > 0, 1.0, torch.where(values < 0, -1.0, B[:, k]))
    return B


def bench_dcc_cifar(device, repeats, g):
    classes, per_class, first_new, m, c, gamma = 10, 5900, 7, 2000, 48, 200.0
    all_labels = torch.nn.functional.one_hot(torch.arange(classes).repeat_interleave(per_class), classes)
    offset = first_new * per_class
    db_labels = all_labels[offset:]  # the learned part: classes 7..9, n = 17,700
    sampled = torch.randperm(all_labels.shape[0], generator=g)[:m]
    sample_labels = all_labels[sampled]
    sample_pos = torch.where(sampled >= offset, sampled - offset, torch.full_like(sampled, -1))
    r = H.soft_similarity_offset(sample_labels, all_labels)
    U = torch.tanh(torch.randn(m, c, generator=g))
    B = (torch.randint(0, 2, (db_labels.shape[0], c), generator=g) * 2 - 1).float()
    args = [t.to(device) for t in (B, U, sample_labels, db_labels, sample_pos)]
    ours, t_ours = timed(lambda: dcc.solve_dcc(*args, gamma, r), device, repeats)
    ref, t_ref = timed(lambda: reference_dcc(*args, gamma, r), device)
    identical = torch.equal(ours, ref)
    assert identical, f"DCC outputs differ in {int((ours != ref).sum())} bits"
    changed = float((ours != args[0]).float().mean())
    return dict(n=db_labels.shape[0], t_ours=t_ours, t_ref=t_ref, identical=identical, changed=changed, r=r)


# ----------------------------------------------------------------------------------------------------
# 2. DCC, NUS-WIDE scale (in a fresh process for a clean memory measurement)

def nus_inputs(seed, n=195_834, m=2000, c=48, tags=21):
    g = torch.Generator().manual_seed(seed)
    # synthetic multi-hot tags: one uniform tag per item plus each tag independently with p = 0.1
    labels = (torch.rand(n, tags, generator=g) < 0.1).to(torch.uint8)
    labels[torch.arange(n), torch.randint(0, tags, (n,), generator=g)] = 1
    sample_pos = torch.randperm(n, generator=g)[:m]
    U = torch.tanh(torch.randn(m, c, generator=g))
    B = (torch.randint(0, 2, (n, c), generator=g) * 2 - 1).to(torch.int8)
    return B, U, labels[sample_pos].clone(), labels, sample_pos


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _nus_child(seed, device, repeats, queue):
    try:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        B, U, sample_labels, db_labels, sample_pos = [t.to(device) for t in nus_inputs(seed)]
        gamma = 200.0
        start = time.perf_counter()
        r = H.soft_similarity_offset(sample_labels, db_labels)
        t_r = time.perf_counter() - start
        patterns = int(torch.unique(db_labels, dim=0).shape[0])
        times = []
        for _ in range(repeats):
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
                base = _status_kib("VmRSS") * 1024
            start = time.perf_counter()
            out = dcc.solve_dcc(B, U, sample_labels, db_labels, sample_pos, gamma, r)
            sync(device)
            times.append(time.perf_counter() - start)
            if torch.device(device).type == "cuda":
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = _status_kib("VmHWM") * 1024 - base
            assert bool(((out == 1) | (out == -1)).all())
            del out
        queue.put(dict(n=B.shape[0], t_ours=statistics.median(times), t_r=t_r, peak=peak, patterns=patterns,
                       input_bytes=sum(t.numel() * t.element_size() for t in (B, U, sample_labels, db_labels))))
    except BaseException as error:  # report, do not hang the parent
        queue.put(dict(error=repr(error)))


def bench_dcc_nus(seed, device, repeats):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_nus_child, args=(seed, device, repeats, queue))
    child.start()
    result = queue.get()
    child.join()
    if "error" in result:
        raise RuntimeError(f"NUS-scale DCC failed: {result['error']}")
    return result


# ----------------------------------------------------------------------------------------------------
# 3. mAP@ALL, CIFAR-10 scale

def reference_map(query_codes, db_codes, query_labels, db_labels):
    """The reference per-query loop (with a stable argsort, so that ties follow the database index)."""
    c = query_codes.shape[1]
    qc, dc = query_codes.float(), db_codes.float()
    ql, dl = query_labels.float(), db_labels.float()
    aps = []
    for i in range(qc.shape[0]):
        hamming = 0.5 * (c - dc @ qc[i])
        order = torch.argsort(hamming, stable=True)
        relevant = (dl[order] @ ql[i] > 0).to(torch.float64)
        total = relevant.sum()
        if total == 0:
            aps.append(0.0)
            continue
        count = torch.arange(1, int(total) + 1, dtype=torch.float64, device=relevant.device)
        positions = torch.nonzero(relevant).squeeze(1).to(torch.float64) + 1
        aps.append(float((count / positions).mean()))
    return sum(aps) / len(aps)


def bench_map(device, repeats, g, q=1000, n=59_000, c=48, classes=10):
    # codes correlated with the classes (a prototype per class, 20% of the bits flipped): many ties
    proto = torch.randint(0, 2, (classes, c), generator=g) * 2 - 1
    db_classes = torch.arange(classes).repeat_interleave(n // classes)
    query_classes = torch.arange(classes).repeat_interleave(q // classes)

    def noisy(cls):
        flip = torch.rand(cls.shape[0], c, generator=g) < 0.2
        return torch.where(flip, -proto[cls], proto[cls]).to(torch.int8)

    args = [t.to(device) for t in (noisy(query_classes), noisy(db_classes),
                                   torch.nn.functional.one_hot(query_classes, classes),
                                   torch.nn.functional.one_hot(db_classes, classes))]
    ours, t_ours = timed(lambda: M.mean_average_precision(*args), device, repeats)
    ref, t_ref = timed(lambda: reference_map(*args), device)
    assert abs(ours - ref) <= 1e-12, (ours, ref)
    return dict(t_ours=t_ours, t_ref=t_ref, ours=ours, ref=ref, q=q, n=n, c=c)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["BENCH_THREADS"] = str(args.threads)  # for the NUS child process
    g = torch.Generator().manual_seed(args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {load:.2f}, metrics CPU back end: {M.CPU_BACKEND}", flush=True)
    rows = []

    cifar = bench_dcc_cifar(args.device, args.repeats, g)
    rows.append((f"DCC n={cifar['n']:,} m=2,000 c=48 (1 label, soft r)", f"{cifar['t_ours']:.3f} s",
                 f"{cifar['t_ref']:.2f} s", f"{cifar['t_ref'] / cifar['t_ours']:.0f}x",
                 f"identical codes ({cifar['changed']:.1%} bits flipped)"))
    print(rows[-1], flush=True)

    if not args.skip_nus:
        nus = bench_dcc_nus(args.seed, args.device, args.repeats)
        kind = "peak RSS growth" if torch.device(args.device).type == "cpu" else "peak CUDA memory"
        rows.append((f"DCC n={nus['n']:,} m=2,000 c=48 (21 tags)", f"{nus['t_ours']:.2f} s", "-", "-",
                     f"{kind} {nus['peak'] / 2**20:.0f} MiB (inputs {nus['input_bytes'] / 2**20:.0f} MiB, "
                     f"{nus['patterns']:,} tag patterns; r: {nus['t_r']:.2f} s)"))
        print(rows[-1], flush=True)

    mp_ = bench_map(args.device, args.repeats, g)
    rows.append((f"mAP@ALL {mp_['q']:,} x {mp_['n']:,} x {mp_['c']} bits", f"{mp_['t_ours']:.3f} s",
                 f"{mp_['t_ref']:.2f} s", f"{mp_['t_ref'] / mp_['t_ours']:.1f}x",
                 f"mAP {mp_['ours']:.6f}, |diff| {abs(mp_['ours'] - mp_['ref']):.1e}"))

    print()
    print(table(("benchmark", "ours", "reference", "speed-up", "check"), rows))


if __name__ == "__main__":
    main()
