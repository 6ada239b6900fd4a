"""What the customer step (``operators.customer_step``) takes and returns.

Its input, its output, and the policy contexts (``Epoch``) its candidates carry:
plain data, so the I/O layer (``flows.step_work``) and the tests build and read them
without the step's machinery.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple

import numpy as np

from crmstream.operators.catalog import Candidate, Promise, TimerPlan
from crmstream.operators.columns import EventColumns
from crmstream.operators.events import ParsedEvent
from crmstream.state.timers import Timer


class Epoch(NamedTuple):
    """The contact policies' view of a customer from one instant of its timeline on."""

    updates: dict[str, str]  # profile fields this step's customer events set so far
    too_often_day: int  # the record's "contacted too often" day (caps)
    erased: bool  # the customer asked to be erased at this instant: suppress
    forget_stored: bool  # erased earlier in the step: the stored profile is gone
    life: int = 0  # erasures before it in the step: a new life starts from a fresh record
    since_ms: int = -1  # the time of the customer event that opened it (-1: as loaded)


def epoch_at(epochs: list[Epoch], at_ms: int) -> Epoch:
    """The context in effect at ``at_ms`` of a customer's contexts (in timeline order): the
    last opened at or before it (an event at the instant comes before a timer due then)."""
    k = bisect_right([e.since_ms for e in epochs], at_ms)
    return epochs[max(k - 1, 0)]


class Erasure(NamedTuple):
    customer: str
    event: ParsedEvent
    kept: int  # timers the record kept pending at the erasure (audit)
    members: frozenset[str]  # timer-set members pending at the erasure, as far as known


class StepInput(NamedTuple):
    customers: list[str]
    records: np.ndarray  # their decoded states, updated in place
    events: list[ParsedEvent]  # the step's fresh events, in input order
    columns: EventColumns  # the events' fields (customer rows in ``customers``)
    members: list[Timer]  # stored timer-set members that may fall due (wakes included)
    promises: dict[str, dict[str, Promise]]  # open orders of the customers that need them
    bound: np.ndarray  # per customer: timers due at or before it fire in this step


class StepOutput(NamedTuple):
    candidates: list[Candidate]
    epochs_of: list[int]  # per candidate: its context in ``epochs[customer]``
    keys: list[tuple[int, ...]]  # per candidate: its place in the customer's timeline
    epochs: dict[str, list[Epoch]]
    plan: TimerPlan  # timer-set members to add and remove, open orders
    fired: list[Timer]  # every timer fired (metrics)
    held: list[Timer]  # quiet-hours holds that fell due: their records go out now
    erasures: list[Erasure]
    touched: np.ndarray  # per customer: its state changed and is written
    late: int  # events too late for the windows

    @classmethod
    def empty(cls) -> StepOutput:
        """A step that did nothing."""
        return cls([], [], [], {}, TimerPlan([], [], {}, {}), [], [], [], np.zeros(0, bool), 0)
