"""esolm.orders: every order builder's structure and its exact random-number consumption; the one
uniform helper and the alpha helper the samplers share."""

import pytest
import torch

from esolm.noise import LogLinearSchedule, uniform
from esolm.orders import free_order, random_order, sample_orders, sort_clean_first, strided_order


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def is_permutation(order: torch.Tensor) -> bool:
    return all(sorted(row.tolist()) == list(range(order.shape[1])) for row in order)


# ------------------------------------------------------------------------------------------- uniform


def test_uniform_dtype_and_seeded_stream():
    a = uniform((3, 5), gen(0), dtype=torch.float64)
    assert a.dtype == torch.float64 and torch.equal(a, torch.rand((3, 5), generator=gen(0), dtype=torch.float64))
    b = uniform((3, 5), gen(0))
    assert b.dtype == torch.float32 and torch.equal(b, torch.rand((3, 5), generator=gen(0)))
    assert ((a >= 0) & (a < 1)).all() and not torch.equal(a, uniform((3, 5), gen(1), dtype=torch.float64))


# ------------------------------------------------------------------------------- the authors' orders


def test_sort_clean_first_is_the_authors_key():
    """``argsort(is_mask + 0.9 U)`` with one float32 [B, L] draw: clean tokens first, both groups random."""
    is_mask = torch.rand(6, 12, generator=gen(1)) < 0.5
    got = sort_clean_first(is_mask, gen(2))
    key = is_mask.float() + 0.9 * torch.rand((6, 12), generator=gen(2))
    assert torch.equal(got, torch.argsort(key, dim=1, stable=True))
    n_clean = (~is_mask).sum(1)
    for row, m, c in zip(got, is_mask, n_clean):
        assert not m[row[:c]].any() and m[row[c:]].all()


def test_sort_clean_first_unshuffled_groups_ascend():
    is_mask = torch.rand(8, 12, generator=gen(3)) < 0.5
    order = sort_clean_first(is_mask, gen(4), shuffle_clean=True, shuffle_masks=False)
    for row, m in zip(order, is_mask):
        masks = row[int((~m).sum()):].tolist()
        assert masks == sorted(masks)
    fixed = sort_clean_first(is_mask, None, shuffle_clean=False, shuffle_masks=False)
    for row, m in zip(fixed, is_mask):
        assert row.tolist() == torch.cat([(~m).nonzero()[:, 0], m.nonzero()[:, 0]]).tolist()


def test_sample_orders_draws_two_float32_uniforms():
    """Diffusion membership from the first [B, L] draw, the random key from the second."""
    b, n, a0 = 5, 10, 0.4
    order = sample_orders(b, n, a0, gen(5))
    g = gen(5)
    diffused = torch.rand((b, n), generator=g) < a0
    noise = torch.rand((b, n), generator=g)
    for row, d, u in zip(order, diffused, noise):
        k = int(d.sum())
        head = row[:k]
        assert d[head].all() and (u[head].diff() >= 0).all()  # diffusion positions, by their key
        assert row[k:].tolist() == (~d).nonzero()[:, 0].tolist()  # the rest left to right


# ------------------------------------------------------------------------------------ sampling orders


def test_random_order_structure_and_draw():
    free = torch.ones(4, 12, dtype=torch.bool)
    free[:, [0, 7]] = False
    order = random_order(free, 6, gen(6))
    assert is_permutation(order)
    u = torch.rand((4, 12), generator=gen(6), dtype=torch.float64).masked_fill(~free, 2.0)
    for row, ur in zip(order, u):
        assert row[:2].tolist() == [0, 7]
        assert row[2:8].tolist() == ur.argsort()[:6].tolist()  # diffusion: by the float64 key
        tail = row[8:].tolist()
        assert tail == sorted(tail)
    assert len({tuple(r.tolist()) for r in order}) > 1


def test_free_order_random_and_ascending():
    free = torch.ones(3, 9, dtype=torch.bool)
    free[:, [2, 5]] = False
    asc = free_order(free, False)
    assert asc.tolist() == [[0, 1, 3, 4, 6, 7, 8]] * 3
    rnd = free_order(free, True, gen(7))
    assert torch.equal(rnd, random_order(free, 9, gen(7))[:, 2:])
    assert all(sorted(r) == [0, 1, 3, 4, 6, 7, 8] for r in rnd.tolist())


@pytest.mark.parametrize("shuffle", [False, True])
def test_strided_order_strides_and_tail(shuffle):
    free = torch.ones(3, 16, dtype=torch.bool)
    free[:, [10, 5]] = False
    order, sizes = strided_order(free, 4, 9, shuffle, gen(8))
    assert is_permutation(order) and (order[:, :2] == torch.tensor([5, 10])).all()
    assert sorted(sizes) == [3, 3, 4, 4] and sum(sizes) == 14
    for row in order:
        lo, left = 2, 9
        for size in sizes:  # the diffusion part: stride after stride, each one residue class mod 4
            block = row[lo:lo + min(size, left)]
            if len(block) == 0:
                break
            assert (block % 4 == block[0] % 4).all() and len(block) in (size, left)
            lo, left = lo + len(block), left - len(block)
        assert left == 0
        tail = row[2 + 9:].tolist()
        assert tail == sorted(tail)  # the sequential tail, re-sorted
    if not shuffle:
        assert order[0].tolist() == [5, 10, 0, 4, 8, 12, 1, 9, 13, 2, 6, 3, 7, 11, 14, 15]


def test_strided_order_errors():
    with pytest.raises(ValueError, match="strides"):
        strided_order(torch.ones(1, 4, dtype=torch.bool), 0, 4)
    free = torch.ones(2, 4, dtype=torch.bool)
    free[0, 1] = False
    free[1, 2] = False
    with pytest.raises(ValueError, match="same given positions"):
        strided_order(free, 2, 3)


# ------------------------------------------------------------------------------------ alpha helper


def test_reveal_prob_is_the_ancestral_step_probability():
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    s = t - 0.25
    mdlm = LogLinearSchedule(1.0, eps=0.0)
    torch.testing.assert_close(mdlm.reveal_prob(t, s), (t - s) / t, atol=1e-15, rtol=0)
    a0 = 0.3
    eso = LogLinearSchedule(a0, eps=0.0)
    expected = a0 * (t - s) / (1 - a0 * (1 - t))
    torch.testing.assert_close(eso.reveal_prob(t, s), expected, atol=1e-15, rtol=0)
    # probability of still being masked at s: (1 - alpha_s) / (1 - alpha_t)
    torch.testing.assert_close(1 - eso.reveal_prob(t, s), (1 - eso.alpha(s)) / (1 - eso.alpha(t)),
                               atol=1e-15, rtol=0)
    assert eso.reveal_prob(1.0, 0.0) == pytest.approx(a0)  # one step: alpha0 of the tokens
