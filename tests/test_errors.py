"""errors.one_line: the one line every error message is built from."""

import errno
import os

from baq.errors import MAX_CHARS, one_line


def test_first_non_empty_line_without_its_trailing_colon():
    err = ValueError("\n\n  Can't load the config of 'x':  \nmake sure that...\n")
    assert one_line(err) == "Can't load the config of 'x'"


def test_os_error_gives_its_reason_not_the_errno_prefix():
    err = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/nope")
    assert one_line(err) == os.strerror(errno.ENOENT)
    assert one_line(OSError("plain message")) == "plain message"


def test_empty_message_names_the_exception_and_long_ones_are_cut():
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("   \n  ")) == "RuntimeError"
    text = one_line(ValueError("x" * 1000))
    assert len(text) == MAX_CHARS and text.endswith("...")
