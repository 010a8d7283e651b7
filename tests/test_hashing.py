"""dihn_dist.method.hashing against slow, obviously correct loops and dense formulas (docs/method.md).

Most DCC problems use small integer-valued U and dyadic r so that every sum is exact in float32: the
fast sweep and the naive reference must then agree bit for bit, including the sgn(0) cases.
"""
import pytest
import torch

import oracles
from dihn_dist.method import dcc
from dihn_dist.method import hashing as H


def gen(seed):
    return torch.Generator().manual_seed(seed)


def one_hot(num_rows, num_classes, g, classes=None):
    idx = torch.randint(0, num_classes, (num_rows,), generator=g) if classes is None else classes
    return torch.nn.functional.one_hot(idx, num_classes).to(torch.uint8)


def multi_hot(num_rows, width, g, p=0.3, allow_empty=False):
    labels = (torch.rand(num_rows, width, generator=g) < p).to(torch.uint8)
    if not allow_empty:
        labels[torch.arange(num_rows), torch.randint(0, width, (num_rows,), generator=g)] = 1
    return labels


def codes(num_rows, bits, g, dtype=torch.float32):
    return (torch.randint(0, 2, (num_rows, bits), generator=g) * 2 - 1).to(dtype)


def int_outputs(num_rows, bits, g, low=-3, high=4):
    """Small integers stored as float: every product and sum below stays exact in float32."""
    return torch.randint(low, high, (num_rows, bits), generator=g).to(torch.float32)


# ----------------------------------------------------------------------------------------------------
# Slow references

def loop_similarity(labels_a, labels_b, r=None):
    a, b = labels_a.tolist(), labels_b.tolist()
    out = []
    for row_a in a:
        row = []
        for row_b in b:
            shared = any(x and y for x, y in zip(row_a, row_b))
            s = 1.0 if shared else -1.0
            if r is not None:
                s = s * (1 + r) - r
            row.append(s)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(len(a), len(b))


def dense_linear_term(U, sample_labels, db_labels, sample_pos, gamma, r):
    """P = c S^T U + gamma Ubar with S dense and Ubar filled by a loop (float64)."""
    U = U.double()
    S = loop_similarity(sample_labels, db_labels, r)
    ubar = torch.zeros(db_labels.shape[0], U.shape[1], dtype=torch.float64)
    for i, p in enumerate(sample_pos.tolist()):
        if p >= 0:
            ubar[p] += U[i]
    return U.shape[1] * S.T @ U + gamma * ubar


def reference_dcc(B, U, sample_labels, db_labels, sample_pos, gamma, r):
    """The reference formulation: per bit torch.cat the other columns, then (B' U'^T) u (n x m temporary)."""
    U = U.double()
    P = dense_linear_term(U, sample_labels, db_labels, sample_pos, gamma, r)
    B = B.double().clone()
    c = B.shape[1]
    for k in range(c):
        B_rest = torch.cat([B[:, :k], B[:, k + 1:]], dim=1)
        U_rest = torch.cat([U[:, :k], U[:, k + 1:]], dim=1)
        values = P[:, k] - (B_rest @ U_rest.T) @ U[:, k]
        B[:, k] = torch.where(values > 0, 1.0, torch.where(values < 0, -1.0, B[:, k]))
    return B


def full_objective(B, U, sample_labels, db_labels, sample_pos, gamma, r):
    """sum_ij (U_i . B_j - c S_ij)^2 + gamma sum_i ||B_pos(i) - U_i||^2 by loops (float64)."""
    S = loop_similarity(sample_labels, db_labels, r).tolist()
    Bl, Ul = B.double().tolist(), U.double().tolist()
    c = B.shape[1]
    total = 0.0
    for i, u in enumerate(Ul):
        for j, b in enumerate(Bl):
            total += (sum(x * y for x, y in zip(u, b)) - c * S[i][j]) ** 2
    for i, p in enumerate(sample_pos.tolist()):
        if p >= 0:
            total += gamma * sum((x - y) ** 2 for x, y in zip(Bl[p], Ul[i]))
    return total


def make_problem(seed, n=40, m=12, c=6, L=5, multi=False, outside=True, integer=True):
    g = gen(seed)
    db_labels = multi_hot(n, L, g) if multi else one_hot(n, L, g)
    sample_pos = torch.randperm(n, generator=g)[:m].clone()
    sample_labels = db_labels[sample_pos].clone()
    if outside:  # some sampled items belong to another part of the database: position -1
        drop = torch.rand(m, generator=g) < 0.4
        drop[0], drop[1] = True, False  # at least one of each
        sample_pos[drop] = -1
        other = multi_hot(m, L, g) if multi else one_hot(m, L, g)
        sample_labels[drop] = other[drop]
    U = int_outputs(m, c, g) if integer else torch.tanh(torch.randn(m, c, generator=g))
    B = codes(n, c, g)
    return B, U, sample_labels, db_labels, sample_pos


# ----------------------------------------------------------------------------------------------------
# Similarity

@pytest.mark.parametrize("r", [None, 0.5, -0.375])
@pytest.mark.parametrize("multi", [False, True])
def test_similarity_matches_loop(r, multi):
    g = gen(1)
    a = multi_hot(9, 6, g) if multi else one_hot(9, 6, g)
    b = multi_hot(11, 6, g) if multi else one_hot(11, 6, g)
    s = oracles.similarity(a, b, r)
    assert s.dtype == torch.float32 and s.shape == (9, 11)
    torch.testing.assert_close(s.double(), loop_similarity(a, b, r), rtol=0, atol=1e-6)


def test_similarity_soft_keeps_positives_at_one():
    g = gen(2)
    a, b = one_hot(8, 4, g), one_hot(10, 4, g)
    hard, soft = oracles.similarity(a, b), oracles.similarity(a, b, r=-0.25)
    assert bool((soft[hard == 1] == 1).all())
    assert bool((soft[hard == -1] == -0.5).all())  # -1 * 0.75 + 0.25


def test_is_single_label():
    assert H.is_single_label(torch.tensor([[0, 1], [1, 0]]))
    assert not H.is_single_label(torch.tensor([[1, 1], [1, 0]]))
    assert not H.is_single_label(torch.tensor([[0, 0], [1, 0]]))


@pytest.mark.parametrize("multi,block_rows", [(False, 4), (True, 1), (True, 3), (True, 10_000)])
def test_count_similar_pairs_matches_loop(multi, block_rows):
    g = gen(3)
    a = multi_hot(13, 5, g, allow_empty=True) if multi else one_hot(13, 5, g)
    b = multi_hot(17, 5, g, allow_empty=True) if multi else one_hot(17, 5, g)
    expected = int((loop_similarity(a, b) > 0).sum())
    assert H.count_similar_pairs(a, b, block_rows=block_rows) == expected


@pytest.mark.parametrize("multi", [False, True])
def test_soft_similarity_offset_matches_dense_formula(multi):
    g = gen(4)
    a = multi_hot(10, 6, g) if multi else one_hot(10, 6, g)
    b = multi_hot(30, 6, g) if multi else one_hot(30, 6, g)
    S = loop_similarity(a, b)
    expected = float(S.sum() / (1 - S).sum())
    assert H.soft_similarity_offset(a, b, block_rows=7) == pytest.approx(expected, rel=1e-12)


def test_soft_similarity_offset_all_similar_is_zero():
    labels = torch.ones(5, 3, dtype=torch.uint8)
    assert H.soft_similarity_offset(labels[:2], labels) == 0.0


def test_soft_similarity_offset_validation():
    with pytest.raises(ValueError, match="sample_labels"):
        H.soft_similarity_offset(torch.tensor([[2, 0]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="db_labels"):
        H.soft_similarity_offset(torch.tensor([[1, 0]]), torch.tensor([[1, 0, 0]]))


@pytest.mark.parametrize("r", [None, 0.25])
def test_similarity_transpose_times_paths_agree_with_dense(r):
    g = gen(5)
    # single-label: factorized, blocked (forced), dense
    a, b = one_hot(12, 4, g), one_hot(25, 4, g)
    U = int_outputs(12, 5, g)
    dense = (loop_similarity(a, b, r).T @ U.double()).float()
    assert torch.equal(H.similarity_transpose_times(a, b, U, r), dense)
    assert torch.equal(H.similarity_transpose_times(a, b, U, r, factorize=True), dense)
    for block_rows in (1, 2, 7):
        assert torch.equal(H.similarity_transpose_times(a, b, U, r, block_rows=block_rows, factorize=False), dense)
    # multi-label: blocked only (labels with no tag at all included)
    a, b = multi_hot(12, 6, g, allow_empty=True), multi_hot(25, 6, g, allow_empty=True)
    dense = (loop_similarity(a, b, r).T @ U.double()).float()
    for block_rows in (1, 3, 16384):
        assert torch.equal(H.similarity_transpose_times(a, b, U, r, block_rows=block_rows), dense)


def test_similarity_transpose_times_float_outputs():
    g = gen(6)
    a, b = multi_hot(20, 7, g), multi_hot(50, 7, g)
    U = torch.tanh(torch.randn(20, 8, generator=g))
    dense = loop_similarity(a, b, -0.3).T @ U.double()
    torch.testing.assert_close(H.similarity_transpose_times(a, b, U, -0.3, block_rows=4).double(), dense,
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Losses

def test_pairwise_hash_loss_matches_loop():
    g = gen(7)
    F = torch.tanh(torch.randn(4, 6, generator=g)).double()
    B = codes(9, 6, g, torch.int8)
    S = loop_similarity(one_hot(4, 3, g), one_hot(9, 3, g), 0.1)
    expected = sum((sum(F[i, k] * float(B[j, k]) for k in range(6)) - 6 * S[i, j]) ** 2
                   for i in range(4) for j in range(9))
    assert float(oracles.pairwise_hash_loss(F, B, S, 6)) == pytest.approx(float(expected), rel=1e-10)


def test_quantization_and_balance_losses_match_loops():
    g = gen(8)
    F = torch.tanh(torch.randn(5, 4, generator=g)).double()
    own = codes(5, 4, g)
    expected = sum((float(own[i, k]) - F[i, k]) ** 2 for i in range(5) for k in range(4))
    assert float(H.quantization_loss(F, own)) == pytest.approx(float(expected), rel=1e-12)
    sums = F.sum(dim=0)
    expected_balance = sum(sum(F[i, k] for i in range(5)) ** 2 for k in range(4))
    assert float(H.bit_balance_loss(sums)) == pytest.approx(float(expected_balance), rel=1e-12)


def loss_of(F, B, S, own, gamma, mu, n, global_batch=None, world_size=1, bit_sums=None):
    hash_term = oracles.pairwise_hash_loss(F, B, S, B.shape[1])
    sums = F.sum(dim=0) if bit_sums is None else bit_sums
    return H.batch_loss(F, hash_term, own, sums, gamma=gamma, mu=mu, num_database=n,
                        global_batch=global_batch or F.shape[0], world_size=world_size)


def test_batch_loss_uses_database_positions():
    """The quantization term pulls each sample towards the code at its *database* index (the reference code
    used the sample's position within the subset: docs/method.md, the reference bugs)."""
    g = gen(9)
    n, batch, c, gamma, mu = 12, 4, 5, 3.0, 0.7
    B = codes(n, c, g)
    F = torch.tanh(torch.randn(batch, c, generator=g)).double()
    db_labels = one_hot(n, 3, g)
    positions = torch.tensor([7, 2, 11, 5])
    S = loop_similarity(db_labels[positions], db_labels)
    own = B[positions]
    hash_term = sum((sum(F[i, k] * float(B[j, k]) for k in range(c)) - c * S[i, j]) ** 2
                    for i in range(batch) for j in range(n))
    quant = sum((float(B[int(positions[i]), k]) - F[i, k]) ** 2 for i in range(batch) for k in range(c))
    balance = sum(sum(F[i, k] for i in range(batch)) ** 2 for k in range(c))
    adsh, _ = loss_of(F, B, S, own, gamma, 0.0, n)
    dihn, terms = loss_of(F, B, S, own, gamma, mu, n)
    assert float(adsh) == pytest.approx(float(hash_term + gamma * quant) / (batch * n), rel=1e-10)
    assert float(dihn) == pytest.approx(float(hash_term + gamma * quant + mu * balance) / (batch * n), rel=1e-10)
    assert set(terms) == {"hash", "quantization", "balance"}
    assert float(terms["quantization"]) == pytest.approx(float(quant), rel=1e-12)
    assert float(terms["balance"]) == pytest.approx(float(balance), rel=1e-12)
    # the reference bug (codes of rows 0..batch-1) gives a different value here
    buggy, _ = loss_of(F, B, S, B[:batch], gamma, 0.0, n)
    assert abs(float(buggy) - float(adsh)) > 1e-6
    with pytest.raises(ValueError, match="bit_sums"):
        H.batch_loss(F, terms["hash"], own, None, gamma=gamma, mu=mu, num_database=n, global_batch=batch)


def test_batch_loss_scaled_per_process_averages_to_the_global_batch_gradient():
    """Two processes with half the batch each: DDP's average of their gradients (the balance term's
    all-reduce backward summing both processes' gradients) equals one process's gradient on the whole batch."""
    g = gen(11)
    n, batch, c, gamma, mu = 10, 6, 4, 2.0, 0.5
    B = codes(n, c, g)
    labels = one_hot(n, 3, g)
    positions = torch.tensor([0, 3, 4, 9, 1, 7])
    S = oracles.similarity(labels[positions], labels).double()
    F = torch.tanh(torch.randn(batch, c, generator=g)).double().requires_grad_()
    whole, _ = loss_of(F, B, S, B[positions], gamma, mu, n)
    expected = torch.autograd.grad(whole, F)[0]

    halves = [slice(0, 3), slice(3, 6)]
    parts = [F.detach()[h].clone().requires_grad_() for h in halves]
    global_sums = sum(p.sum(dim=0) for p in parts)  # the all-reduce, differentiable into both halves
    grads = [torch.zeros_like(p) for p in parts]
    for h in halves:  # each process's loss; its backward reaches both halves through the all-reduce
        index = halves.index(h)
        loss, _ = loss_of(parts[index], B, S[h], B[positions][h], gamma, mu, n, global_batch=batch,
                          world_size=2, bit_sums=global_sums)
        for target, grad in zip(grads, torch.autograd.grad(loss, parts, retain_graph=True)):
            target += grad
    averaged = torch.cat(grads) / 2  # DDP's average over the two processes
    assert torch.allclose(averaged, expected, rtol=1e-10, atol=1e-12)


def test_losses_are_differentiable():
    g = gen(10)
    F = torch.tanh(torch.randn(3, 4, generator=g)).requires_grad_()
    B = codes(6, 4, g)
    S = oracles.similarity(one_hot(3, 2, g), one_hot(6, 2, g))
    loss, _ = loss_of(F, B, S, B[:3], 2.0, 1.0, 6)
    loss.backward()
    assert F.grad is not None and bool(torch.isfinite(F.grad).all()) and float(F.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------------------------------
# DCC

def test_sign_keep():
    values = torch.tensor([2.0, -0.5, 0.0, 0.0, -0.0])
    previous = torch.tensor([-1, 1, 1, -1, 1], dtype=torch.int8)
    assert oracles.sign_keep(values, previous).tolist() == [1.0, -1.0, 1.0, -1.0, 1.0]


@pytest.mark.parametrize("r", [None, 0.5])
@pytest.mark.parametrize("multi", [False, True])
def test_dcc_linear_term_matches_loops(r, multi):
    B, U, sl, dl, pos = make_problem(11, multi=multi)
    P = dcc.dcc_linear_term(U, sl, dl, pos, gamma=2.5, r=r, block_rows=3)
    assert torch.equal(P, dense_linear_term(U, sl, dl, pos, 2.5, r).float())


def test_dcc_objective_equals_full_objective_up_to_a_constant():
    _, U, sl, dl, pos = make_problem(12, n=10, m=6, c=4, integer=False)
    gamma, r = 3.0, 0.25
    P = dcc.dcc_linear_term(U, sl, dl, pos, gamma, r).double()
    g = gen(13)
    offsets = []
    for _ in range(4):
        B = codes(10, 4, g)
        ours = float(oracles.dcc_objective(B.double(), U.double(), P))
        offsets.append(full_objective(B, U, sl, dl, pos, gamma, r) - ours)
    assert max(offsets) - min(offsets) < 1e-6 * max(1.0, abs(offsets[0]))


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("r", [None, 0.5, -0.375])
@pytest.mark.parametrize("seed", [0, 1])
def test_solve_dcc_equals_naive_reference(multi, r, seed):
    B, U, sl, dl, pos = make_problem(20 + seed, multi=multi)
    expected = reference_dcc(B, U, sl, dl, pos, 4.0, r)
    got = dcc.solve_dcc(B, U, sl, dl, pos, 4.0, r)
    assert torch.equal(got.double(), expected)


def test_solve_dcc_tanh_outputs_agree_with_reference():
    B, U, sl, dl, pos = make_problem(30, n=60, m=20, c=8, multi=True, integer=False)
    r = H.soft_similarity_offset(sl, dl)
    expected = reference_dcc(B, U, sl, dl, pos, 200.0, r)
    got = dcc.solve_dcc(B, U, sl, dl, pos, 200.0, r)
    assert torch.equal(got.double(), expected)


@pytest.mark.parametrize("multi", [False, True])
def test_each_bit_update_never_increases_the_objective(multi):
    B, U, sl, dl, pos = make_problem(40, n=30, m=10, c=8, multi=multi, integer=False)
    gamma, r = 5.0, 0.2
    P = dcc.dcc_linear_term(U, sl, dl, pos, gamma, r).double()
    Ud = U.double()
    current = B.double().clone()
    gram = Ud.T @ Ud
    before = full_objective(current, U, sl, dl, pos, gamma, r)
    assert float(oracles.dcc_objective(current, Ud, P)) < before  # (the constant is positive here)
    for k in range(B.shape[1]):
        others = sum(current[:, j] * gram[j, k] for j in range(B.shape[1]) if j != k)
        previous_objective = float(oracles.dcc_objective(current, Ud, P))
        current[:, k] = oracles.sign_keep(P[:, k] - others, current[:, k])
        after = float(oracles.dcc_objective(current, Ud, P))
        assert after <= previous_objective + 1e-9 * abs(previous_objective)
        full_after = full_objective(current, U, sl, dl, pos, gamma, r)
        assert full_after <= before + 1e-9 * abs(before)
        before = full_after
    assert torch.equal(dcc.solve_dcc(B, U, sl, dl, pos, gamma, r).double(), current)


@pytest.mark.parametrize("r", [None, 0.25])
def test_blocked_factorized_and_dense_paths_agree(r):
    B, U, sl, dl, pos = make_problem(50, n=70, m=25, c=7, L=6)
    expected = reference_dcc(B, U, sl, dl, pos, 3.0, r)
    factorized = dcc.solve_dcc(B, U, sl, dl, pos, 3.0, r, factorize=True)
    assert torch.equal(factorized.double(), expected)
    for block_rows in (1, 2, 5, 16384):
        blocked = dcc.solve_dcc(B, U, sl, dl, pos, 3.0, r, block_rows=block_rows, factorize=False)
        assert torch.equal(blocked, factorized)
    B, U, sl, dl, pos = make_problem(51, n=70, m=25, c=7, L=6, multi=True)
    expected = reference_dcc(B, U, sl, dl, pos, 3.0, r)
    for block_rows in (1, 2, 5, 16384):
        assert torch.equal(dcc.solve_dcc(B, U, sl, dl, pos, 3.0, r, block_rows=block_rows).double(), expected)


def test_sample_pos_minus_one_is_outside_the_part():
    B, U, sl, dl, pos = make_problem(61, n=20, m=8, c=5)
    all_outside = torch.full_like(pos, -1)
    expected = reference_dcc(B, U, sl, dl, all_outside, 10.0, None)
    assert torch.equal(dcc.solve_dcc(B, U, sl, dl, all_outside, 10.0).double(), expected)
    # gamma only matters through the sampled items that are inside
    assert torch.equal(dcc.solve_dcc(B, U, sl, dl, all_outside, 10.0), dcc.solve_dcc(B, U, sl, dl, all_outside, 0.0))
    # Ubar: U's rows added at the positions of the sampled items that are inside, nowhere else
    inside = dcc.dcc_linear_term(U, sl, dl, pos, 10.0) - dcc.dcc_linear_term(U, sl, dl, pos, 0.0)
    expected_ubar = torch.zeros(20, 5)
    for i, p in enumerate(pos.tolist()):
        if p >= 0:
            expected_ubar[p] += 10.0 * U[i]
    assert (pos == -1).any() and (pos >= 0).any()
    assert torch.equal(inside, expected_ubar)


def test_zero_update_keeps_the_previous_bit():
    B, U, sl, dl, pos = make_problem(70, n=30, m=10, c=6)
    U = U.clone()
    U[:, 2] = 0  # bit 2: P[:, 2] = 0 and U_{-2}^T u_2 = 0, so every update of bit 2 is exactly 0
    got = dcc.solve_dcc(B, U, sl, dl, pos, 2.0, 0.5)
    assert torch.equal(got[:, 2], B[:, 2])
    assert torch.equal(got.double(), reference_dcc(B, U, sl, dl, pos, 2.0, 0.5))
    assert not torch.equal(got, B)  # the other bits did move
    # all-zero U: nothing moves, and no 0 bit appears
    zero = dcc.solve_dcc(B, torch.zeros_like(U), sl, dl, pos, 2.0)
    assert torch.equal(zero, B)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float32, torch.float64])
def test_solve_dcc_code_dtypes_and_inputs_untouched(dtype):
    B, U, sl, dl, pos = make_problem(80, multi=True)
    B = B.to(dtype)
    saved = [t.clone() for t in (B, U, sl, dl, pos)]
    got = dcc.solve_dcc(B, U, sl, dl, pos, 1.5, 0.5)
    for before, after in zip(saved, (B, U, sl, dl, pos)):
        assert torch.equal(before, after)
    assert got.dtype == dtype and got.shape == B.shape and got.device == B.device
    assert got.data_ptr() != B.data_ptr()
    assert bool(((got == 1) | (got == -1)).all())
    assert torch.equal(got.double(), reference_dcc(B, U, sl, dl, pos, 1.5, 0.5))


def test_solve_dcc_accepts_double_outputs_and_label_dtypes():
    B, U, sl, dl, pos = make_problem(81)
    base = dcc.solve_dcc(B, U, sl, dl, pos, 1.0, 0.5)
    assert torch.equal(dcc.solve_dcc(B, U.double(), sl.bool(), dl.float(), pos.int(), 1.0, 0.5), base)


def test_solve_dcc_validation_errors():
    B, U, sl, dl, pos = make_problem(90, n=10, m=4, c=3)
    ok = dict(B=B, U=U, sample_labels=sl, db_labels=dl, sample_pos=pos, gamma=1.0)

    def call(**changes):
        return dcc.solve_dcc(**{**ok, **changes})

    cases = [
        ("B", dict(B=B * 2)),
        ("B", dict(B=B[:, 0])),
        ("B", dict(B=B[:0])),
        ("U", dict(U=U[:, :2])),
        ("U", dict(U=U[:0])),
        ("U", dict(U=U.flatten())),
        ("U", dict(U=torch.full_like(U, float("nan")))),
        ("sample_labels", dict(sample_labels=sl * 3)),
        ("sample_labels", dict(sample_labels=sl[:2])),
        ("sample_labels", dict(sample_labels=sl[:, :0], db_labels=dl[:, :0])),
        ("db_labels", dict(db_labels=dl[:, :2])),
        ("db_labels", dict(db_labels=dl[:5])),
        ("db_labels", dict(db_labels=dl - 1)),
        ("sample_pos", dict(sample_pos=pos[:2])),
        ("sample_pos", dict(sample_pos=pos.float())),
        ("sample_pos", dict(sample_pos=pos.tolist())),
        ("sample_pos", dict(sample_pos=torch.full_like(pos, 10))),
        ("sample_pos", dict(sample_pos=torch.full_like(pos, -2))),
    ]
    for name, changes in cases:
        with pytest.raises(ValueError, match=f"^{name}:"):
            call(**changes)
    call()  # and the unchanged call is fine


def test_solve_dcc_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    B, U, sl, dl, pos = make_problem(100, n=500, m=64, c=16, multi=True)
    expected = dcc.solve_dcc(B, U, sl, dl, pos, 3.0, 0.5)
    got = dcc.solve_dcc(B.cuda(), U.cuda(), sl.cuda(), dl.cuda(), pos.cuda(), 3.0, 0.5)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), expected)
    B, U, sl, dl, pos = make_problem(101, n=500, m=64, c=16)
    got = dcc.solve_dcc(B.cuda(), U.cuda(), sl.cuda(), dl.cuda(), pos.cuda(), 3.0, None)
    assert torch.equal(got.cpu(), dcc.solve_dcc(B, U, sl, dl, pos, 3.0, None))


def test_label_patterns_by_int64_keys_equal_torch_unique_rows():
    g = torch.Generator().manual_seed(12)
    labels = (torch.rand(500, 21, generator=g) < 0.15).float()
    patterns, inverse = H._unique_label_rows(labels, torch.device("cpu"))
    expected_patterns, expected_inverse = torch.unique(labels != 0, dim=0, return_inverse=True)
    assert torch.equal(patterns, expected_patterns) and torch.equal(inverse, expected_inverse)


def test_kept_database_patterns_give_the_same_offset_and_codes():
    g = gen(13)
    db_labels = (torch.rand(300, 5, generator=g) < 0.3).float()
    db_labels[torch.arange(300), torch.randint(0, 5, (300,), generator=g)] = 1
    sample = torch.randperm(300, generator=g)[:40]
    kept = H.label_patterns(db_labels)
    r = H.soft_similarity_offset(db_labels[sample], db_labels)
    assert H.soft_similarity_offset(db_labels[sample], db_labels, db_patterns=kept) == r
    B = codes(300, 8, g)
    U = torch.tanh(torch.randn(40, 8, generator=g))
    args = (B, U, db_labels[sample], db_labels, sample, 5.0, r)
    assert torch.equal(dcc.solve_dcc(*args), dcc.solve_dcc(*args, db_patterns=kept))
