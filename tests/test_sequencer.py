"""RoomSequencer: order, gaps, duplicates and epochs, without any I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from realtime.core.sequencer import Entry, RoomSequencer, SequencerState


def e(offset: int, epoch: str = "a") -> Entry:
    return Entry(epoch, offset, b"m%d" % offset)


def offsets(entries: list[Entry]) -> list[int]:
    return [x.offset for x in entries]


def live(last: int = 0, epoch: str | None = "a", keep: int = 10) -> RoomSequencer:
    seq = RoomSequencer(keep)
    seq.start(epoch, last)
    return seq


def test_in_order_entries_are_delivered_at_once() -> None:
    seq = live()
    assert offsets(seq.offer(e(1), 0).deliver) == [1]
    assert offsets(seq.offer(e(2), 0).deliver) == [2]
    assert seq.state is SequencerState.LIVE


def test_a_gap_holds_later_entries_until_it_fills() -> None:
    seq = live()
    assert seq.offer(e(2), 1.0).deliver == []
    assert seq.offer(e(3), 1.5).deliver == []
    assert seq.state is SequencerState.HOLDING
    assert seq.gap() == (0, 3)
    assert seq.gap_since == 1.0
    assert offsets(seq.offer(e(1), 2.0).deliver) == [1, 2, 3]
    assert seq.gap() is None
    assert seq.gap_since is None


def test_duplicates_are_dropped() -> None:
    seq = live()
    seq.offer(e(1), 0)
    assert seq.offer(e(1), 0).deliver == []
    seq.offer(e(3), 0)
    assert seq.offer(e(3), 0).deliver == []
    assert seq.duplicates == 2


def test_entries_held_while_syncing_are_delivered_after_the_baseline() -> None:
    seq = RoomSequencer(10)
    for o in (5, 6):
        assert seq.offer(e(o), 0).deliver == []
    # The store read happened after 5 was written: its tail ends at 5.
    step = seq.start("a", 5, [e(3), e(4), e(5)])
    assert offsets(step.deliver) == [5, 6]  # they came after the subscription
    assert offsets(seq.since(2) or []) == [3, 4, 5, 6]


def test_nothing_held_while_syncing_starts_at_the_newest() -> None:
    seq = RoomSequencer(10)
    assert seq.start("a", 5, [e(4), e(5)]).deliver == []
    assert seq.last == 5


def test_fill_from_history_repairs_a_gap_and_skips_what_is_gone() -> None:
    seq = live(last=10)
    seq.offer(e(14), 0)
    # History still has 12 and 13, but 11 was evicted.
    step = seq.fill("a", [e(12), e(13), e(14)], newest=14, now=1)
    assert offsets(step.deliver) == [12, 13, 14]
    assert step.lost == 1
    assert seq.lost == 1
    assert seq.state is SequencerState.LIVE


def test_fill_holds_what_came_after_the_read() -> None:
    """A read answered at newest 12; 15 reached the pod after it (13 and 14
    are on their way, or were missed and will be repaired): nothing past 12
    is known to be gone, so 15 stays held and nothing is counted lost."""
    seq = live(last=10)
    seq.offer(e(12), 0)
    seq.offer(e(15), 0)
    step = seq.fill("a", [e(11), e(12)], newest=12, now=1)
    assert offsets(step.deliver) == [11, 12]
    assert step.lost == 0
    assert seq.gap() == (12, 15)
    assert offsets(seq.offer(e(13), 2).deliver) == [13]
    assert offsets(seq.offer(e(14), 2).deliver) == [14, 15]


def test_fill_says_nothing_past_the_end_of_a_limited_read() -> None:
    """A read of at most 2 entries (a gap's repair, from 10 up to the 12
    held when it started) says nothing of 13 and 14 even though the room
    had more by then; 15, held meanwhile, waits for them. What a limited
    read covers and did not return is gone, as always."""
    seq = live(last=10)
    seq.offer(e(12), 0)
    seq.offer(e(15), 0)
    step = seq.fill("a", [e(11), e(12)], newest=20, now=1, limit=2)
    assert offsets(step.deliver) == [11, 12]
    assert step.lost == 0
    assert seq.gap() == (12, 15)
    seq = live(last=10)
    seq.offer(e(15), 0)
    step = seq.fill("a", [e(12), e(13)], newest=20, now=1, limit=2)  # 11 was evicted
    assert offsets(step.deliver) == [12, 13]
    assert step.lost == 1
    assert seq.gap() == (13, 15)


def test_new_epoch_restarts_at_one_and_is_reported() -> None:
    seq = live(last=50)
    step = seq.offer(e(1, "b"), 0)
    assert step.epoch_changed
    assert offsets(step.deliver) == [1]
    assert seq.epoch == "b"
    assert seq.last == 1


def test_first_epoch_of_an_empty_room_is_not_a_change() -> None:
    seq = live(last=0, epoch=None)
    step = seq.offer(e(1, "x"), 0)
    assert not step.epoch_changed
    assert offsets(step.deliver) == [1]


def test_since_serves_from_memory_or_says_it_cannot() -> None:
    seq = live(keep=3)
    for o in range(1, 6):
        seq.offer(e(o), 0)
    assert offsets(seq.since(2) or []) == [3, 4, 5]
    assert seq.since(1) is None  # 2 is no longer remembered
    assert seq.since(5) == []


def test_since_never_serves_across_a_hole() -> None:
    seq = live(keep=10)
    seq.offer(e(1), 0)
    seq.offer(e(3), 0)
    seq.skip_gap(1)  # 2 is lost: memory starts again after it
    assert [(x.epoch, x.offset, x.payload) for x in seq.since(2) or []] == [("a", 3, b"m3")]
    assert seq.since(1) is None

    # a stored tail with a hole: only what follows the hole is remembered
    seq = RoomSequencer(10)
    seq.start("a", 5, [e(1), e(2), e(4), e(5)])
    assert offsets(seq.since(3) or []) == [4, 5]
    assert seq.since(2) is None


def test_skip_gap_gives_up_on_the_missing_offsets() -> None:
    seq = live()
    seq.offer(e(3), 0)
    step = seq.skip_gap(1)
    assert offsets(step.deliver) == [3]
    assert step.lost == 2


def test_max_pending_bounds_what_is_held() -> None:
    seq = RoomSequencer(10, max_pending=3)
    seq.start("a", 0)
    for o in range(2, 6):
        step = seq.offer(e(o), 0)
    assert offsets(step.deliver) == [2, 3, 4, 5]
    assert seq.lost == 1


@given(
    st.permutations(list(range(1, 41))),
    st.lists(st.integers(min_value=1, max_value=40), max_size=20),
)
def test_any_arrival_order_with_duplicates_delivers_each_once_in_order(
    order: list[int], dupes: list[int]
) -> None:
    seq = live()
    out: list[int] = []
    for o in order + dupes:
        out += offsets(seq.offer(e(o), 0).deliver)
    assert out == list(range(1, 41))
