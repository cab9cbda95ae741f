"""The instance key's file (actors.model.instance_files.KeyFile): readable by this user only,
and gone with its folder once forgotten (a day of starts left hundreds of empty folders)."""

from __future__ import annotations

import stat

from actors.model.instance_files import KeyFile


def test_the_key_file_and_its_folder_go_when_forgotten() -> None:
    keys = KeyFile("chat")
    first = keys.write("sk-1")
    assert first.read_text() == "sk-1\n"
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    second = keys.write("sk-2")  # a restart: the old key goes first
    assert not first.exists() and second.read_text() == "sk-2\n"
    keys.forget()
    assert not second.exists() and not second.parent.exists()
    assert not first.parent.exists()
    keys.forget()  # twice is fine
