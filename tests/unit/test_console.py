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
        "warning: m: failed: exited 1\n    log tail"
    )
    assert event_line({"kind": "crashed", "model": "m", "code": -9, "restart_in": 2.0}) == (
        "warning: m: llama-server exited with code -9; restarting in 2 s"
    )
    assert event_line({"kind": "config_rejected", "errors": ["a", "b"]}) == (
        "warning: config rejected (the running one is kept): a; b"
    )
    reason = "its llama-server at 10.0.0.7:8080 did not accept a connection in 5 s"
    unreachable = {"kind": "unreachable", "model": "m", "node_id": "ab12", "reason": reason}
    assert event_line(unreachable) == (
        "warning: m: its llama-server at 10.0.0.7:8080 did not accept a connection in 5 s;"
        " placed elsewhere, and node ab12 takes no new model until it answers"
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


def test_a_failed_start_shows_what_its_log_says_went_wrong() -> None:
    """The reason ends "the last lines of its log:"; the console shows the error lines of that
    tail (as the real llama-server wrote them for a corrupt file), not nothing."""
    reason = (
        "model 'm' failed to start: llama-server exited with code 1 while loading; the last "
        "lines of its log:\n"
        "0.00.001.121 I srv  llama_server: initializing ...\n"
        "0.00.004.354 I srv    load_model: loading model 'broken.gguf'\n"
        "0.00.004.527 E gguf_init_from_reader: failed to read key-value pairs\n"
        "0.00.004.726 E srv    load_model: failed to load model, 'broken.gguf'\n"
        "0.00.004.844 I srv    operator(): cleaning up before exit..."
    )
    line = event_line({"kind": "failed", "model": "m", "reason": reason})
    assert line is not None
    first, *details = line.split("\n")
    assert first.endswith("the last lines of its log:")
    assert details == [
        "    0.00.004.527 E gguf_init_from_reader: failed to read key-value pairs",
        "    0.00.004.726 E srv    load_model: failed to load model, 'broken.gguf'",
    ]
