"""SaidOnce: a condition is said when it begins or changes, and its end once."""

from __future__ import annotations

from thinwatchd.base.said_once import SaidOnce


def test_a_streak_is_said_at_its_start_and_at_each_change_only() -> None:
    said: SaidOnce[str] = SaidOnce()
    assert said.says("error", "EIO")
    assert not said.says("error", "EIO")  # the same, again: not news
    assert said.says("error", "ENOSPC")  # changed: news
    assert said.get("error") == "ENOSPC"
    assert "error" in said and list(said) == ["error"] and len(said) == 1


def test_its_end_is_news_once_and_a_new_streak_is_said_again() -> None:
    said: SaidOnce[int] = SaidOnce()
    assert not said.ends(7)  # nothing was said of it
    assert said.says(7)
    assert said.ends(7)
    assert not said.ends(7)
    assert 7 not in said and said.get(7) is None
    assert said.says(7)  # a new streak


def test_keys_can_be_forgotten_while_iterating() -> None:
    said: SaidOnce[int] = SaidOnce()
    for dev in (1, 2, 3):
        said.says(dev)
    for dev in said:
        if dev != 2:
            said.ends(dev)
    assert list(said) == [2]
