"""rsq.quiet: the named third-party notes stay off export/verify output; anything else, and native output
of a call that fails, still reaches the user."""
import logging
import os
import warnings

import pytest

from rsq.quiet import native_stderr_captured, third_party_notes_off


def test_named_notes_are_off_inside_and_back_after(caplog):
    logger = logging.getLogger("torch.utils._pytree")
    before = logger.level
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with third_party_notes_off():
            warnings.warn("fast_hadamard_transform package not found, using standard pytorch kernels")
            warnings.warn("something else")
            with caplog.at_level(logging.WARNING):
                logger.warning("registered the old way")
    assert [str(w.message) for w in seen] == ["something else"]
    assert "registered the old way" not in caplog.text
    assert logger.level == before


def test_native_stderr_is_dropped_when_the_call_succeeds_and_replayed_when_it_fails(capfd):
    with native_stderr_captured():
        os.write(2, b"[cpuinfo_utils.cpp:71] probing\n")
    assert "probing" not in capfd.readouterr().err
    with pytest.raises(RuntimeError):
        with native_stderr_captured():
            os.write(2, b"native detail of the failure\n")
            raise RuntimeError("load failed")
    assert "native detail of the failure" in capfd.readouterr().err
    os.write(2, b"after\n")  # fd 2 is the terminal's again
    assert "after" in capfd.readouterr().err
