"""The compiled event id digest is BLAKE2b-64, the same as hashlib's."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.operators.hashing import event_id_digests


def _hashlib(ids: list[str]) -> list[int]:
    return [
        int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids
    ]


def test_block_edges_and_the_empty_id():
    # 128-byte blocks: one short of, exactly and one past one and two blocks
    ids = ["", "a", *("x" * n for n in (127, 128, 129, 255, 256, 257, 1000)), "é" * 64]
    assert event_id_digests(ids).tolist() == _hashlib(ids)
    assert event_id_digests([]).dtype == np.uint64 and len(event_id_digests([])) == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=300), max_size=20))
def test_any_batch_of_ids_hashes_as_hashlib_does(ids):
    assert event_id_digests(ids).tolist() == _hashlib(ids)
