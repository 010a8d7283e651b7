"""What a finished stage's network and codes look like: the evidence behind docs/quality.md.

    python tests/bench/diagnose_stage.py RUN_DIR [--stage original] [--data PREPARED_DIR]

Prints, for the stage's saved network on the query images:
  - per activation layer, the units (channels for convolutions) that are at or below zero for every query
    ("dead": they pass no gradient through a ReLU) and the mean fraction of active unit-positions;
and, for the stage's database codes:
  - the mean of every bit (0 = balanced);
  - per class, the distinct codes its items hold, the share of its most common code, and the share of its
    queries whose code is that code;
  - the share of queries whose code is strictly nearer their own class's majority code than any other
    class's (what Hamming ranking then gets right first);
and the gradient of the trainer's loss (one batch of 64 sampled database items, the stage's codes) for each
parameter of the stage's network and of a fresh one against random codes, next to Adam's eps (1e-8).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dihn_dist.data.loader import eval_batches
from dihn_dist.data.prepared import load_prepared
from dihn_dist.method import hashing
from dihn_dist.models.networks import build_model, input_resolution
from dihn_dist.serving.retrieve import load_network
from dihn_dist.training.run_reader import load_run


def activation_report(network: nn.Module, batches) -> list:
    """(layer, units, dead units, mean active fraction) per ReLU-like layer, over every batch."""
    seen = collections.defaultdict(list)
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: seen[name].append(out.detach()))
             for name, module in network.named_modules() if isinstance(module, (nn.ReLU, nn.LeakyReLU))]
    with torch.no_grad():
        for images, _, _ in batches:
            network(images)
    for hook in hooks:
        hook.remove()
    rows = []
    for name, outputs in seen.items():
        stacked = torch.cat(outputs)
        per_unit = stacked.transpose(0, 1).reshape(stacked.shape[1], -1)
        active = per_unit > 0
        rows.append((name, per_unit.shape[0], int((~active.any(dim=1)).sum()), float(active.float().mean())))
    return rows


def code_report(codes: np.ndarray, labels: np.ndarray, query_codes: np.ndarray, query_labels: np.ndarray):
    """Per class: (class, distinct codes, majority share, queries on the majority code); then the share of
    queries strictly nearest their own class's majority code."""
    as_key = lambda rows: [row.tobytes() for row in rows]  # noqa: E731
    classes = sorted(set(labels.tolist()))
    majority, rows = {}, []
    for cls in classes:
        counts = collections.Counter(as_key(codes[labels == cls]))
        code, held = counts.most_common(1)[0]
        majority[cls] = np.frombuffer(code, dtype=codes.dtype)
        on_it = np.mean([key == code for key in as_key(query_codes[query_labels == cls])] or [np.nan])
        rows.append((cls, len(counts), held / int((labels == cls).sum()), float(on_it)))
    centres = np.stack([majority[cls] for cls in classes]).astype(np.int32)
    mask = np.isin(query_labels, classes)
    distances = (codes.shape[1] - query_codes[mask].astype(np.int32) @ centres.T) // 2
    own = np.searchsorted(classes, query_labels[mask])
    own_distance = distances[np.arange(len(own)), own]
    distances[np.arange(len(own)), own] = codes.shape[1] + 1
    return rows, float(np.mean(own_distance < distances.min(axis=1)))


def gradient_report(network: nn.Module, data, codes: torch.Tensor, resolution: int, gamma: float, seed: int = 0):
    """(parameter, gradient rms, median |gradient|, share below 1e-7) of the stage's loss on one batch."""
    num_rows = codes.shape[0]
    labels = torch.from_numpy(data.database_labels[:num_rows]).float()
    patterns, pattern_of_row = hashing.label_patterns(labels)
    sample = np.random.default_rng(seed).choice(num_rows, min(2000, num_rows), replace=False)
    r = hashing.soft_similarity_offset(labels[sample], labels, db_patterns=(patterns, pattern_of_row))
    stats = hashing.hash_term_stats(codes, patterns, pattern_of_row, r)
    rows = np.sort(sample[:64])
    images = next(iter(eval_batches(data, "database", batch_size=64, resolution=resolution, device="cpu",
                                    num_workers=1, indices=rows)))[0]
    network.train().zero_grad()
    outputs = network(images)
    loss, _ = hashing.batch_loss(outputs, hashing.factorized_hash_loss(outputs, pattern_of_row[rows], stats),
                                 codes[rows], None, gamma=gamma, mu=0.0, num_database=num_rows, global_batch=64)
    loss.backward()
    return [(name, float(p.grad.pow(2).mean().sqrt()), float(p.grad.abs().median()),
             float((p.grad.abs() < 1e-7).float().mean())) for name, p in network.named_parameters()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--stage", default="original")
    parser.add_argument("--data", help="the prepared folder (default: the one the run was trained on)")
    args = parser.parse_args(argv)
    run = load_run(args.run_dir)
    stage = run.stage(args.stage)
    data = load_prepared(args.data or run.config["data"])
    network = load_network(run, stage)
    resolution = input_resolution(run.config["arch"], run.config.get("resolution"), data.image_size)
    batches = eval_batches(data, "query", batch_size=500, resolution=resolution, device="cpu", num_workers=1)
    print(f"{run.root} stage {args.stage}: network on {run.query_labels.shape[0]} query images")
    for name, units, dead, active in activation_report(network, batches):
        print(f"  {name:14s} {units:4d} units, {dead:4d} dead ({dead / units:.0%}), mean active fraction {active:.3f}")
    labels = run.database_labels[:stage.num_database].argmax(axis=1)
    query_labels = run.query_labels.argmax(axis=1)
    codes = stage.database_codes
    print(f"  bit means: {np.round(codes.mean(axis=0), 2).tolist()}")
    rows, nearest_own = code_report(codes, labels, stage.query_codes, query_labels)
    for cls, distinct, share, on_it in rows:
        print(f"  class {cls}: {distinct:5d} distinct codes, majority code holds {share:.3f}, "
              f"queries on it {on_it:.2f}")
    print(f"  queries strictly nearest their own class's majority code: {nearest_own:.3f}")
    torch.manual_seed(0)
    random_codes = torch.randint(0, 2, codes.shape).float() * 2 - 1
    for title, net, with_codes in (("the stage's network and codes", network, torch.from_numpy(codes).float()),
                                   ("a fresh network and random codes (iteration 1)",
                                    build_model(run.config["arch"], run.code_length), random_codes)):
        print(f"  gradients of the loss, {title} (Adam's eps: 1e-8):")
        for name, rms, median, tiny in gradient_report(net, data, with_codes, resolution, run.config["gamma"]):
            print(f"    {name:22s} rms {rms:.1e}  median |g| {median:.1e}  below 1e-7: {tiny:.1%}")


if __name__ == "__main__":
    main()
