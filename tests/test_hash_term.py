"""The factorized hash term (dihn_dist.method.hashing: label_patterns, hash_term_stats, factorized_hash_loss)
against the dense batch x database oracle pairwise_hash_loss(outputs, B, S, c), in float64.

The oracle builds S in float64: similarity(..., r) returns float32, whose -(1+2r) is rounded to about
1e-7, far above the 1e-9 relative tolerance used here.
"""
import pytest
import torch

import oracles
from dihn_dist.method import hashing as H

RTOL = 1e-9


def gen(seed):
    return torch.Generator().manual_seed(seed)


def one_hot(num_rows, num_classes, g):
    return torch.nn.functional.one_hot(torch.randint(0, num_classes, (num_rows,), generator=g),
                                       num_classes).to(torch.uint8)


def multi_hot(num_rows, width, g, max_labels=3):
    """1..max_labels distinct labels per row; with a small width many rows share a pattern."""
    labels = torch.zeros(num_rows, width, dtype=torch.uint8)
    counts = torch.randint(1, max_labels + 1, (num_rows,), generator=g)
    for i, k in enumerate(counts.tolist()):
        labels[i, torch.randperm(width, generator=g)[:k]] = 1
    return labels


def random_codes(num_rows, bits, g):
    return (torch.randint(0, 2, (num_rows, bits), generator=g) * 2 - 1).to(torch.float32)


def dense_similarity(batch_labels, db_labels, r):
    S = oracles.similarity(batch_labels, db_labels).double()  # exactly +-1
    return S if r is None else S * (1 + r) - r


def dense_oracle(outputs, codes, batch_labels, db_labels, r):
    """(loss, d loss / d outputs) of the dense hash term, float64."""
    u = outputs.double().detach().requires_grad_(True)
    loss = oracles.pairwise_hash_loss(u, codes.double(), dense_similarity(batch_labels, db_labels, r), codes.shape[1])
    return loss.detach(), torch.autograd.grad(loss, u)[0]


def factorized(outputs, codes, db_labels, positions, r, block_rows=H.DEFAULT_PATTERN_BLOCK_ROWS):
    """(loss, d loss / d outputs) of the factorized hash term for the batch at database positions."""
    patterns, pattern_of_row = H.label_patterns(db_labels)
    stats = H.hash_term_stats(codes, patterns, pattern_of_row, r, block_rows)
    u = outputs.detach().clone().requires_grad_(True)
    loss = H.factorized_hash_loss(u, stats.patterns_at(positions), stats)
    return loss.detach(), torch.autograd.grad(loss, u)[0]


def assert_close(got, expected):
    got, expected = got.double(), expected.double()
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=RTOL * scale)


def soft_offset(db_labels, g, num_samples=16):
    sample = torch.randperm(db_labels.shape[0], generator=g)[:num_samples]
    return H.soft_similarity_offset(db_labels[sample], db_labels)


def check_against_oracle(codes, db_labels, positions, outputs, r, **kwargs):
    loss, grad = factorized(outputs, codes, db_labels, positions, r, **kwargs)
    expected_loss, expected_grad = dense_oracle(outputs, codes, db_labels[positions], db_labels, r)
    assert loss.dtype == outputs.dtype
    assert_close(loss, expected_loss)
    assert_close(grad, expected_grad)


# ----------------------------------------------------------------------------------------------------
# Agreement with the dense oracle

@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("multi", [False, True])
def test_matches_dense_oracle(multi, soft):
    g = gen(1 + 2 * multi + soft)
    n, b, c = 300, 24, 16
    db_labels = multi_hot(n, 6, g) if multi else one_hot(n, 7, g)
    codes = random_codes(n, c, g)
    r = soft_offset(db_labels, g) if soft else None
    positions = torch.randperm(n, generator=g)[:b]
    outputs = torch.tanh(torch.randn(b, c, generator=g, dtype=torch.float64))
    check_against_oracle(codes, db_labels, positions, outputs, r)


def test_soft_oracle_is_the_library_similarity():
    """The float64 soft S of the oracle is similarity(..., r) up to float32 rounding."""
    g = gen(5)
    db_labels = multi_hot(50, 5, g)
    r = soft_offset(db_labels, g)
    torch.testing.assert_close(dense_similarity(db_labels[:9], db_labels, r).float(),
                               oracles.similarity(db_labels[:9], db_labels, r))


def test_float32_outputs_get_float32_loss_and_gradient():
    g = gen(6)
    n, b, c = 200, 16, 12
    db_labels = multi_hot(n, 5, g)
    codes = random_codes(n, c, g)
    r = soft_offset(db_labels, g)
    positions = torch.randint(0, n, (b,), generator=g)
    outputs = torch.tanh(torch.randn(b, c, generator=g))
    loss, grad = factorized(outputs, codes, db_labels, positions, r)
    assert loss.dtype == grad.dtype == torch.float32
    expected_loss, expected_grad = dense_oracle(outputs, codes, db_labels[positions], db_labels, r)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-6, atol=1e-6 * float(expected_grad.abs().max()))


@pytest.mark.parametrize("soft", [False, True])
def test_stage_two_with_frozen_rows(soft):
    """Codes = a frozen block then a learned block: the stats cover every row, the batch both parts."""
    g = gen(7 + soft)
    num_frozen, num_learned, c, L = 180, 120, 16, 6
    frozen_labels, learned_labels = multi_hot(num_frozen, L, g), multi_hot(num_learned, L, g)
    db_labels = torch.cat([frozen_labels, learned_labels])
    codes = torch.cat([random_codes(num_frozen, c, g), random_codes(num_learned, c, g)])
    r = soft_offset(db_labels, g) if soft else None
    positions = torch.cat([torch.randperm(num_frozen, generator=g)[:10],
                           num_frozen + torch.randperm(num_learned, generator=g)[:10]])
    outputs = torch.randn(positions.shape[0], c, generator=g, dtype=torch.float64)
    check_against_oracle(codes, db_labels, positions, outputs, r)


@pytest.mark.parametrize("soft", [False, True])
def test_small_blocks_give_the_one_block_result(soft):
    g = gen(9 + soft)
    n, c = 250, 8
    db_labels = multi_hot(n, 6, g)
    codes = random_codes(n, c, g)
    r = soft_offset(db_labels, g) if soft else None
    patterns, pattern_of_row = H.label_patterns(db_labels)
    assert patterns.shape[0] > 3 * 3  # several blocks on each side
    one_block = H.hash_term_stats(codes, patterns, pattern_of_row, r, block_rows=patterns.shape[0])
    blocked = H.hash_term_stats(codes, patterns, pattern_of_row, r, block_rows=3)
    # integer sums in float64: the block order changes nothing
    assert torch.equal(blocked.targets, one_block.targets)
    assert torch.equal(blocked.target_norms, one_block.target_norms)
    assert torch.equal(blocked.gram, one_block.gram)
    positions = torch.randint(0, n, (20,), generator=g)
    outputs = torch.randn(20, c, generator=g, dtype=torch.float64)
    check_against_oracle(codes, db_labels, positions, outputs, r, block_rows=3)


def test_batch_with_repeated_items():
    g = gen(11)
    n, c = 120, 8
    db_labels = multi_hot(n, 4, g)
    codes = random_codes(n, c, g)
    r = soft_offset(db_labels, g)
    positions = torch.tensor([3, 3, 3, 17, 40, 17])
    outputs = torch.randn(6, c, generator=g, dtype=torch.float64)
    outputs[1] = outputs[0]  # the same item twice with the same output, and once with another
    check_against_oracle(codes, db_labels, positions, outputs, r)


def test_rows_without_labels_share_nothing():
    """similarity() gives -1 to an all-zero label row against everything, itself included."""
    g = gen(12)
    n, c = 100, 8
    db_labels = multi_hot(n, 5, g)
    db_labels[::7] = 0
    codes = random_codes(n, c, g)
    positions = torch.arange(0, n, 5)
    outputs = torch.randn(positions.shape[0], c, generator=g, dtype=torch.float64)
    for r in (None, soft_offset(db_labels, g)):
        check_against_oracle(codes, db_labels, positions, outputs, r)


def test_empty_batch_is_zero():
    g = gen(13)
    db_labels = one_hot(30, 3, g)
    patterns, pattern_of_row = H.label_patterns(db_labels)
    stats = H.hash_term_stats(random_codes(30, 4, g), patterns, pattern_of_row)
    loss = H.factorized_hash_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), stats)
    assert loss.item() == 0.0


# ----------------------------------------------------------------------------------------------------
# label_patterns and the stats themselves

@pytest.mark.parametrize("multi", [False, True])
def test_label_patterns_reconstruct_the_labels(multi):
    g = gen(14)
    db_labels = multi_hot(400, 5, g) if multi else one_hot(400, 9, g)
    patterns, pattern_of_row = H.label_patterns(db_labels)
    assert patterns.dtype == torch.bool and pattern_of_row.dtype == torch.long
    assert torch.equal(patterns[pattern_of_row], db_labels != 0)
    assert torch.unique(patterns, dim=0).shape[0] == patterns.shape[0]  # distinct
    if not multi:
        assert patterns.shape[0] == int((db_labels.sum(0) > 0).sum())  # one per class present


def test_stats_values_on_a_hand_example():
    """Three rows, labels {0}, {0,1}, {1}; patterns 0 and 2 share nothing, 1 shares with both."""
    db_labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    codes = torch.tensor([[1., 1.], [1., -1.], [-1., -1.]])
    patterns, pattern_of_row = H.label_patterns(db_labels)
    r = 0.25
    stats = H.hash_term_stats(codes, patterns, pattern_of_row, r)
    S = dense_similarity(patterns.to(torch.uint8), db_labels, r)  # P x n, float64
    assert torch.equal(stats.gram, codes.double().T @ codes.double())
    assert_close(stats.targets, S @ codes.double())
    assert_close(stats.target_norms, (S ** 2).sum(1))
    assert (stats.code_length, stats.num_database, stats.num_patterns) == (2, 3, 3)
    hard = H.hash_term_stats(codes, patterns, pattern_of_row)
    assert torch.equal(hard.target_norms, torch.full((3,), 3.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# Bad input

def valid_inputs():
    g = gen(20)
    db_labels = multi_hot(20, 4, g)
    codes = random_codes(20, 6, g)
    patterns, pattern_of_row = H.label_patterns(db_labels)
    return codes, db_labels, patterns, pattern_of_row


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([[0, 2], [1, 0]]), "db_labels: labels must be 0/1"),
    (torch.ones(4), "db_labels: expected a 2-D 0/1 label matrix"),
    (torch.zeros(0, 3), "db_labels: is empty"),
])
def test_label_patterns_rejects_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        H.label_patterns(labels)


def test_hash_term_stats_rejects_bad_input():
    codes, _, patterns, pattern_of_row = valid_inputs()
    cases = [
        (dict(codes=codes * 0.5), "codes: codes must be"),
        (dict(codes=codes[0]), "codes: expected a 2-D tensor"),
        (dict(codes=codes[:0]), "codes: is empty"),
        (dict(patterns=patterns.to(torch.uint8) * 3), "patterns: labels must be 0/1"),
        (dict(patterns=patterns[:0]), "patterns: is empty"),
        (dict(pattern_of_row=pattern_of_row[:-1]), r"pattern_of_row: expected shape \(20,\)"),
        (dict(pattern_of_row=pattern_of_row.float()), "pattern_of_row: expected an integer tensor"),
        (dict(pattern_of_row=pattern_of_row + patterns.shape[0]), r"pattern_of_row: pattern ids must be in"),
        (dict(pattern_of_row=pattern_of_row - 100), r"pattern_of_row: pattern ids must be in"),
        (dict(r=float("nan")), "r: expected None or a finite number"),
        (dict(r="0.5"), "r: expected None or a finite number"),
        (dict(block_rows=0), "block_rows: expected a positive integer"),
        (dict(block_rows=2.0), "block_rows: expected a positive integer"),
    ]
    for change, match in cases:
        args = dict(codes=codes, patterns=patterns, pattern_of_row=pattern_of_row, r=None, block_rows=4)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            H.hash_term_stats(**args)


def test_factorized_hash_loss_rejects_bad_input():
    codes, _, patterns, pattern_of_row = valid_inputs()
    stats = H.hash_term_stats(codes, patterns, pattern_of_row)
    outputs, ids = torch.zeros(5, 6), pattern_of_row[:5]
    cases = [
        ((outputs[:, :5], ids, stats), "outputs: expected a 2-D float tensor with 6 columns"),
        ((outputs[0], ids, stats), "outputs: expected a 2-D float tensor"),
        ((outputs.long(), ids, stats), "outputs: expected a 2-D float tensor"),
        ((outputs, ids[:4], stats), r"batch_patterns: expected shape \(5,\) to match outputs"),
        ((outputs, ids.double(), stats), "batch_patterns: expected an integer tensor"),
        ((outputs, ids + stats.num_patterns, stats), "batch_patterns: pattern ids must be in"),
        ((outputs, ids, {"gram": stats.gram}), "stats: expected a HashTermStats"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            H.factorized_hash_loss(*args)


# ----------------------------------------------------------------------------------------------------
# Scale and devices

@pytest.mark.parametrize("multi", [False, True])
def test_large_database_without_n_by_n(multi):
    """n = 200,000 rows (c = 48): stats are O(n c^2 + P^2), so this runs in about a second on a CPU.
    A few batch items are still checked against the dense oracle (b x n, small)."""
    g = gen(30 + multi)
    n, c = 200_000, 48
    if multi:  # 21 labels, 1-3 per row: 1,561 possible patterns
        db_labels = torch.zeros(n, 21, dtype=torch.uint8)
        for k in range(3):
            columns = torch.randint(0, 21, (n,), generator=g)
            keep = torch.rand(n, generator=g) < (1.0 if k == 0 else 0.5)
            db_labels[torch.arange(n)[keep], columns[keep]] = 1
    else:
        db_labels = one_hot(n, 100, g)
    codes = random_codes(n, c, g)
    r = soft_offset(db_labels, g, num_samples=64)
    positions = torch.randint(0, n, (6,), generator=g)
    outputs = torch.tanh(torch.randn(6, c, generator=g, dtype=torch.float64))
    check_against_oracle(codes, db_labels, positions, outputs, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_matches_cpu():
    g = gen(40)
    n, c = 500, 16
    db_labels = multi_hot(n, 6, g)
    codes = random_codes(n, c, g)
    r = soft_offset(db_labels, g)
    positions = torch.randint(0, n, (32,), generator=g)
    outputs = torch.randn(32, c, generator=g, dtype=torch.float64)
    patterns, pattern_of_row = H.label_patterns(db_labels.cuda())
    stats = H.hash_term_stats(codes.cuda(), patterns, pattern_of_row, r, block_rows=5)
    assert stats.gram.device.type == stats.targets.device.type == "cuda"
    u = outputs.cuda().requires_grad_(True)
    loss = H.factorized_hash_loss(u, stats.patterns_at(positions), stats)
    assert loss.device.type == "cuda"
    grad = torch.autograd.grad(loss, u)[0]
    expected_loss, expected_grad = dense_oracle(outputs, codes, db_labels[positions], db_labels, r)
    assert_close(loss.cpu(), expected_loss)
    assert_close(grad.cpu(), expected_grad)
