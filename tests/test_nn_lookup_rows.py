"""``tables.lookup_rows``: ``F.embedding``'s rows, by a flat gather for one-column tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from appmult.nn import tables as T


@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(7,), (4, 5), (2, 3, 4)])
def test_rows_equal_embedding(r, idx_dtype, shape):
    g = torch.Generator().manual_seed(r)
    table = torch.randn((11, r), generator=g, dtype=torch.float64)
    idx = torch.randint(0, 11, shape, generator=g).to(idx_dtype)
    out = T.lookup_rows(idx, table)
    assert out.shape == (*shape, r) and out.dtype == table.dtype
    assert torch.equal(out, F.embedding(idx, table))
    assert torch.equal(out, table[idx.long()])  # independent: advanced indexing


def test_one_column_tables_take_the_flat_gather(monkeypatch):
    monkeypatch.setattr(T, "F", None)  # no F.embedding to fall back to
    table = torch.arange(5, dtype=torch.float32).reshape(5, 1) * 3
    idx = torch.tensor([[4, 0], [2, 2]], dtype=torch.int32)
    assert T.lookup_rows(idx, table).reshape(2, 2).tolist() == [[12.0, 0.0], [6.0, 6.0]]


def test_a_permuted_index_view():
    table = torch.randn((9, 1))
    idx = torch.randint(0, 9, (2, 3, 4, 5)).permute(0, 2, 3, 1)
    assert torch.equal(T.lookup_rows(idx, table), F.embedding(idx, table))


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("bad", [5, -1])
def test_an_index_outside_the_table_raises(r, bad):
    with pytest.raises(IndexError):
        T.lookup_rows(torch.tensor([0, bad]), torch.zeros((5, r)))
