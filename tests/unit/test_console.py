"""The product's console lines: `proxifier serve`'s event lines, `proxifier start`'s progress."""

from __future__ import annotations

from proxifier.console import event_line, start_line


def test_events_an_operator_wants_read_as_one_line() -> None:
    assert event_line({"kind": "ready", "model": "chat", "load_seconds": 2.345}) == (
        "chat: ready (loaded in 2.3 s)"
    )
    assert event_line(
        {"kind": "downloaded", "model": "m", "file": "o/r/f.gguf", "bytes": 3 * 1024**3,
         "seconds": 61.0}
    ) == "m: downloaded o/r/f.gguf (3.0 GiB, 61.0 s)"  # fmt: skip
    assert event_line({"kind": "failed", "model": "m", "reason": "exited 1\nlog tail"}) == (
        "warning: m: failed: exited 1"
    )
    assert event_line({"kind": "crashed", "model": "m", "code": -9, "restart_in": 2.0}) == (
        "warning: m: llama-server exited with code -9; restarting in 2 s"
    )
    assert event_line({"kind": "config_rejected", "errors": ["a", "b"]}) == (
        "warning: config rejected (the running one is kept): a; b"
    )
    # Bookkeeping stays out of the console.
    for kind in ("placed", "starting", "config_backup", "leases_reclaimed", "gpus_found"):
        assert event_line({"kind": kind, "model": "m"}) is None


def test_start_progress_says_what_the_model_waits_for() -> None:
    assert start_line("m", {"state": "starting", "progress": "downloading 1.2/4.7 GiB"}, 9) == (
        "m: downloading 1.2/4.7 GiB"
    )
    assert start_line("m", {"state": "starting"}, 3.4) == "m: loading (3 s)"
    assert start_line("m", {"state": "stopped", "waiting_for": "no GPU free\nmore"}, 1) == (
        "m: waiting to be placed: no GPU free"
    )
    assert start_line("m", {"state": "ready"}, 4.25) == "m: ready in 4.2 s"
    assert start_line("m", {"state": "failed", "last_error": "bad file\ntail"}, 1) == (
        "m: failed: bad file"
    )
