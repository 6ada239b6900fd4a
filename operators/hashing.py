"""Event id digests for the duplicate check: BLAKE2b with an 8-byte digest, compiled.

The duplicate ring in each customer's state keeps 64-bit digests of event ids,
not the ids (docs/guarantees.md). They are BLAKE2b (RFC 7693, unkeyed, 8-byte
digest) of the id's UTF-8 bytes, read as a little-endian 64-bit integer:
the same value ``hashlib.blake2b(id.encode(), digest_size=8)`` gives, which
tests/test_hashing.py checks. ``hashlib`` costs about 0.7 µs per id, most of
it building a hash object; this kernel hashes a whole batch's ids in one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

DIGEST_BYTES = 8
_BLOCK = 128

_IV = np.array(
    [
        0x6A09E667F3BCC908,
        0xBB67AE8584CAA73B,
        0x3C6EF372FE94F82B,
        0xA54FF53A5F1D36F1,
        0x510E527FADE682D1,
        0x9B05688C2B3E6C1F,
        0x1F83D9ABFB41BD6B,
        0x5BE0CD19137E2179,
    ],
    np.uint64,
)
_SIGMA = np.array(
    [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
        [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
        [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
        [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
        [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
        [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
        [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
        [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
        [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
    ],
    np.int64,
)
# Parameter block word 0 for an unkeyed hash with an 8-byte digest (RFC 7693, 2.5).
_PARAM0 = np.uint64(0x01010000 | DIGEST_BYTES)


@njit(cache=True, nogil=True, inline="always")
def _rotr(x, n):
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


@njit(cache=True, nogil=True, inline="always")
def _g(a, b, c, d, x, y):
    """The mixing function G (RFC 7693, 3.1) on four state words, returned."""
    a = a + b + x
    d = _rotr(d ^ a, 32)
    c = c + d
    b = _rotr(b ^ c, 24)
    a = a + b + y
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 63)
    return a, b, c, d


@njit(cache=True, nogil=True)
def _compress(h, m, counter, last):
    """The compression function F on one block's 16 words (RFC 7693, 3.2); the state
    words are locals, so they stay in registers."""
    v0, v1, v2, v3, v4, v5, v6, v7 = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]
    v8, v9, v10, v11 = _IV[0], _IV[1], _IV[2], _IV[3]
    v12 = _IV[4] ^ np.uint64(counter)  # the byte counter's high word is 0: ids are short
    v13, v14, v15 = _IV[5], _IV[6], _IV[7]
    if last:
        v14 = ~v14
    for r in range(12):
        s = r % 10
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m[_SIGMA[s, 0]], m[_SIGMA[s, 1]])
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m[_SIGMA[s, 2]], m[_SIGMA[s, 3]])
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m[_SIGMA[s, 4]], m[_SIGMA[s, 5]])
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m[_SIGMA[s, 6]], m[_SIGMA[s, 7]])
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m[_SIGMA[s, 8]], m[_SIGMA[s, 9]])
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m[_SIGMA[s, 10]], m[_SIGMA[s, 11]])
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m[_SIGMA[s, 12]], m[_SIGMA[s, 13]])
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m[_SIGMA[s, 14]], m[_SIGMA[s, 15]])
    h[0] ^= v0 ^ v8
    h[1] ^= v1 ^ v9
    h[2] ^= v2 ^ v10
    h[3] ^= v3 ^ v11
    h[4] ^= v4 ^ v12
    h[5] ^= v5 ^ v13
    h[6] ^= v6 ^ v14
    h[7] ^= v7 ^ v15


@njit(cache=True, nogil=True)
def _digests(buf, ends, out):
    """BLAKE2b-64 of each ``buf[ends[i-1]:ends[i]]`` into ``out[i]``."""
    h = np.empty(8, np.uint64)
    block = np.zeros(_BLOCK, np.uint8)
    words = block.view(np.uint64)  # little-endian words, as the RFC reads a block
    start = 0
    for i in range(len(ends)):
        end = ends[i]
        h[:] = _IV
        h[0] ^= _PARAM0
        pos = start
        # Every full block but the last goes through unflagged; the last one (possibly
        # short, zero-padded, or empty for empty input) is flagged final.
        while end - pos > _BLOCK:
            block[:] = buf[pos : pos + _BLOCK]
            pos += _BLOCK
            _compress(h, words, pos - start, False)
        block[:] = 0
        block[: end - pos] = buf[pos:end]
        _compress(h, words, end - start, True)
        out[i] = h[0]
        start = end


def event_id_digests(event_ids: Sequence[str]) -> np.ndarray:
    """The 64-bit digest of each event id (``hashlib.blake2b(id.encode(),
    digest_size=8)`` read little-endian), as one uint64 array."""
    joined = "".join(event_ids)
    if joined.isascii():  # the usual case: one byte per character, one encode
        lengths = np.fromiter(map(len, event_ids), np.int64, len(event_ids))
        raw = joined.encode()
    else:
        encoded = list(map(str.encode, event_ids))
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        raw = b"".join(encoded)
    out = np.empty(len(lengths), np.uint64)
    if len(lengths):
        _digests(np.frombuffer(raw, np.uint8), np.cumsum(lengths), out)
    return out
