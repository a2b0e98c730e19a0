"""Every mask builder equals a brute-force double loop written from the rules of METHOD.md section 3.

The loops below state the rules in words-as-code (one query, one key at a time) and share nothing
with the vectorised builders.
"""

import pytest
import torch

from esolm.model import masks

LENGTHS = [1, 2, 5, 8, 12]


def _counts(length, gen):
    """Random clean counts per example, always including the extremes 0 and L."""
    extra = torch.randint(0, length + 1, (3,), generator=gen).tolist()
    return [0, length] + extra


def brute_causal(length):
    return [[key <= query for key in range(length)] for query in range(length)]


def brute_prefix_lm(n_clean, length):
    """Eso-LM (A) diffusion: clean tokens (first n_clean) see each other bidirectionally and nothing
    else; a mask sees every clean token, the earlier masks and itself."""
    rows = []
    for q in range(length):
        row = []
        for k in range(length):
            if q < n_clean:
                row.append(k < n_clean)
            else:
                row.append(k < n_clean or (n_clean <= k <= q))
        rows.append(row)
    return rows


def brute_block_diffusion(length, block):
    """[x_t ; x_0]: x_t block b sees its own x_t block and x_0 blocks before b; x_0 is block-causal."""
    size = 2 * length
    rows = []
    for q in range(size):
        row = []
        q_noisy, qi = q < length, q % length
        for k in range(size):
            k_noisy, ki = k < length, k % length
            qb, kb = qi // block, ki // block
            if q_noisy and k_noisy:
                row.append(qb == kb)
            elif q_noisy and not k_noisy:
                row.append(kb < qb)
            elif not q_noisy and k_noisy:
                row.append(False)
            else:
                row.append(kb <= qb)
        rows.append(row)
    return rows


def brute_sequential(length, n_clean=None):
    """Eso-LM sequential phase on [z ; x]: z-query i sees z-key i and x-keys j < i; x-query i sees
    x-keys j <= i (and, for variant A, every clean x-key when itself clean); x never sees z."""
    size = 2 * length
    rows = []
    for q in range(size):
        row = []
        for k in range(size):
            qz, kz = q < length, k < length
            i, j = q % length, k % length
            if qz and kz:
                ok = i == j
            elif qz:
                ok = j < i
            elif kz:
                ok = False
            else:
                ok = j <= i
                if n_clean is not None and i < n_clean and j < n_clean:
                    ok = True
            row.append(ok)
        rows.append(row)
    return rows


def brute_cached_step(cache_len, n_new):
    return [[k < cache_len or (k - cache_len) <= q for k in range(cache_len + n_new)] for q in range(n_new)]


def _t(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _check(mask, expected, batch=1):
    assert mask.dtype == torch.bool
    assert mask.shape == (batch, 1, *expected.shape[-2:])
    assert torch.equal(mask[:, 0], expected.expand(batch, *expected.shape[-2:]))


@pytest.mark.parametrize("length", LENGTHS)
def test_causal_and_bidirectional(length):
    _check(masks.causal(length), _t(brute_causal(length)))
    _check(masks.bidirectional(length), torch.ones(length, length, dtype=torch.bool))


@pytest.mark.parametrize("length", LENGTHS)
def test_prefix_lm_per_example(length):
    gen = torch.Generator().manual_seed(length)
    counts = _counts(length, gen)
    expected = torch.stack([_t(brute_prefix_lm(c, length)) for c in counts])
    _check(masks.prefix_lm(torch.tensor(counts), length), expected, batch=len(counts))
    # all clean = bidirectional; nothing clean = causal
    assert masks.prefix_lm(length, length).all()
    assert torch.equal(masks.prefix_lm(0, length)[0, 0], _t(brute_causal(length)))


@pytest.mark.parametrize("length", LENGTHS)
def test_sequential(length):
    _check(masks.sequential(length), _t(brute_sequential(length)))


@pytest.mark.parametrize("length", LENGTHS)
def test_sequential_prefix_per_example(length):
    gen = torch.Generator().manual_seed(100 + length)
    counts = _counts(length, gen)
    expected = torch.stack([_t(brute_sequential(length, c)) for c in counts])
    _check(masks.sequential_prefix(torch.tensor(counts), length), expected, batch=len(counts))
    # with no clean token it is exactly variant B's mask
    assert torch.equal(masks.sequential_prefix(0, length), masks.sequential(length))


@pytest.mark.parametrize("length,block", [(1, 1), (4, 1), (4, 2), (4, 4), (12, 3), (12, 4), (16, 8)])
def test_block_diffusion(length, block):
    _check(masks.block_diffusion(length, block), _t(brute_block_diffusion(length, block)))


@pytest.mark.parametrize("length", LENGTHS)
def test_sequential_is_block_diffusion_with_block_one(length):
    assert torch.equal(masks.sequential(length), masks.block_diffusion(length, 1))


@pytest.mark.parametrize("cache_len,n_new", [(0, 1), (0, 5), (3, 1), (3, 4), (7, 2)])
def test_cached_steps(cache_len, n_new):
    _check(masks.cached_step(cache_len, n_new), _t(brute_cached_step(cache_len, n_new)))
    _check(masks.cached_block_step(cache_len, n_new), torch.ones(n_new, cache_len + n_new, dtype=torch.bool))


def test_every_query_attends_to_itself():
    """No fully masked row (SDPA would return NaN): each token always sees its own key."""
    length = 6
    counts = torch.tensor([0, 2, 6])
    for m in [masks.causal(length), masks.prefix_lm(counts, length), masks.sequential(length),
              masks.sequential_prefix(counts, length), masks.block_diffusion(length, 2)]:
        assert m[:, 0].diagonal(dim1=-2, dim2=-1).all()


def test_cached_step_tail_equals_causal_rows():
    """A cached step's rows are the rows of the full causal mask for the same absolute positions."""
    full = masks.causal(9)[0, 0]
    assert torch.equal(masks.cached_step(4, 5)[0, 0], full[4:9])


@pytest.mark.parametrize("length,block", [(8, 3), (8, 0), (8, -2), (6, 4)])
def test_bad_block_size(length, block):
    with pytest.raises(ValueError, match="block size"):
        masks.block_diffusion(length, block)


@pytest.mark.parametrize("builder", [masks.prefix_lm, masks.sequential_prefix])
@pytest.mark.parametrize("counts", [[-1], [9], [0, 3, 9]])
def test_bad_clean_counts(builder, counts):
    with pytest.raises(ValueError, match="clean counts"):
        builder(torch.tensor(counts), 8)
