"""pytest plugin for runs with ``NUMBA_DISABLE_JIT=1`` (the mutation runs: tests/MUTATION.md).

Interpreted, the Numba kernels read a customer record by attribute
(``r.type_counts``), which a plain structured array's element does not allow;
a ``np.recarray``'s does. This plugin makes the two constructors of records
(``fresh_records``, ``decode_batch``) return recarray views before any module
binds them, so the kernels run as plain Python on the same data. Compiled runs
never load it.
"""

from __future__ import annotations

import os

import numpy as np

if os.environ.get("NUMBA_DISABLE_JIT") == "1":
    from crmstream.state import encoding

    _fresh, _decode = encoding.fresh_records, encoding.decode_batch

    def fresh_records(*args, **kwargs):
        return _fresh(*args, **kwargs).view(np.recarray)

    def decode_batch(*args, **kwargs):
        return _decode(*args, **kwargs).view(np.recarray)

    fresh_records.__doc__, decode_batch.__doc__ = _fresh.__doc__, _decode.__doc__
    encoding.fresh_records, encoding.decode_batch = fresh_records, decode_batch
