"""kne._text's padding helpers, shared by the edit batch, the neighbours, the corpus statistics and
the earlier edits' keys."""
from types import SimpleNamespace

import pytest
import torch

from kne._text import pad_batch, pad_id


@pytest.mark.parametrize("pad, eos, want", [(7, 2, 7), (None, 2, 2), (None, None, 0), (0, 5, 0)])
def test_pad_id_prefers_pad_then_eos_then_zero(pad, eos, want):
    assert pad_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == want


@pytest.mark.parametrize("left", [False, True])
def test_pad_batch_places_tokens_and_mask(left):
    seqs = [[5, 6, 7], [8], [9, 10]]
    ids, mask = pad_batch(seqs, 1, left=left)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 3)
    for b, s in enumerate(seqs):
        real = ids[b][mask[b].bool()].tolist()
        assert real == s and int(mask[b].sum()) == len(s)
        assert (ids[b][~mask[b].bool()] == 1).all()
        held = mask[b].nonzero().flatten().tolist()
        assert held == (list(range(3 - len(s), 3)) if left else list(range(len(s))))
