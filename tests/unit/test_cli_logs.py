"""`proxifier logs --follow`: which lines of a read are new."""

from __future__ import annotations

from proxifier.cli_admin import new_lines


def test_logs_follow_prints_only_what_is_new() -> None:
    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    assert new_lines(["a", "b"], ["x", "y"]) == ["x", "y"]  # more came than a read holds
    assert new_lines([], ["a"]) == ["a"]
