"""A fixed sample of mutants, in the slow suite: a drop in the mutation score is seen.

``tests/mutation/run.py`` runs the same 12 mutants (seed 39) of each module below
against its fast tests, as ``make mutate`` does for every mutant; the score of
each (killed over non-equivalent) must stay at or above its floor in
tests/mutation/floors.json, the score tests/MUTATION.md reports less a margin for
a sample this small. A test removed or weakened so that mutants it killed now
survive fails here, naming them. The modules are ones whose mutants no compiled
kernel holds (a mutant of events.py recompiles the kernels: a minute each), so the
sample takes a few minutes; ``make mutate`` covers the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mutation import run

pytestmark = pytest.mark.slow

FLOORS = json.loads((Path(__file__).parent / "mutation" / "floors.json").read_text())


@pytest.mark.parametrize("module", sorted(FLOORS))
def test_a_fixed_sample_of_mutants_is_killed(module, tmp_path):
    out = tmp_path / "tally.json"
    run.main(["--module", module, "--sample", "12", "--seed", "39", "--out", str(out)])
    (tally,) = json.loads(out.read_text())
    assert not tally.get("skipped"), tally
    print(f"{module}: {tally['score']} % of {tally['run'] - tally['equivalent']} "
          f"non-equivalent mutants killed; survivors: {tally['survivors']}")  # fmt: skip
    assert tally["score"] >= FLOORS[module], tally["survivors"]
