"""`proxifier logs --follow`: which lines of a read are new."""

from __future__ import annotations

from typing import Any

import pytest

from proxifier.cli_admin import _logs, new_lines


def test_logs_follow_prints_only_what_is_new() -> None:
    assert new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    assert new_lines(["a", "b"], ["x", "y"]) == ["x", "y"]  # more came than a read holds
    assert new_lines([], ["a"]) == ["a"]


class Admin:
    """The server's answers to `proxifier logs`, one read after another; then Ctrl-C."""

    def __init__(self, reads: list[list[str]]) -> None:
        self.reads, self.asked = reads, []

    def call(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        self.asked.append(params["lines"])
        if not self.reads:
            raise KeyboardInterrupt
        return {"lines": self.reads.pop(0)}


def test_follow_shows_the_last_lines_asked_for_then_only_new_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = [f"line {i}" for i in range(300)]  # longer than -n: earlier lines are not repeated
    admin = Admin([log, [*log[2:], "new 1", "new 2"], [*log[4:], "new 1", "new 2"]])
    assert _logs(admin, "m", 3, follow=True, interval=0.0) == 0  # type: ignore[arg-type]
    assert capsys.readouterr().out.splitlines() == [
        "line 297", "line 298", "line 299", "new 1", "new 2",
    ]  # fmt: skip
    assert admin.asked[0] == admin.asked[1]  # the first read matches what later ones read
