"""One-line wording of the errors the command line reports (pipeline/errors.py)."""

from __future__ import annotations

import errno

import pytest

from attnseg.pipeline.errors import first_line, naming_file, os_error_line


def test_first_line():
    assert first_line(ValueError("bad thing\nmore detail")) == "bad thing"
    assert first_line(KeyError()) == "KeyError"


def test_os_errors_say_what_failed_where_and_what_to_do():
    full = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/d/x.jpg"))
    assert full.startswith("No space left on device (/d/x.jpg)") and "run the same command" in full
    ro = os_error_line(OSError(errno.EROFS, "Read-only file system", "/ro"))
    assert "(/ro)" in ro and "folder you can write to" in ro
    assert os_error_line(OSError(errno.EIO, "Input/output error")) == "Input/output error"


def test_a_failed_write_is_named():
    with pytest.raises(OSError) as info, naming_file("/data/out.tar"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == "/data/out.tar"
    with pytest.raises(OSError) as info, naming_file("/data/out.tar"):
        raise OSError(errno.ENOSPC, "No space left on device", "/other")
    assert info.value.filename == "/other"  # a name it already had is kept
