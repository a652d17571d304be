"""Third-party chatter kept off rsq's export and verify output.

`rsq export` and `rsq verify` print one line per format written and one table; the libraries under
them print notes meant for their own developers or for other set-ups, which a user cannot act on:
torch's note that a pytree constant is registered the old way (torchao does it), its "No CUDA runtime
is found" when brevitas loads (rsq's export paths run on the CPU), brevitas's note that an optional
Hadamard kernel is missing, torch.onnx's progress lines inside brevitas's QONNX export, and the CPU
probe that XNNPACK's C++ code prints when ExecuTorch loads a method. Real errors still surface: only
these named notes are filtered, and captured native output is replayed when the call fails.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

_LOGGERS = ("torch.utils._pytree", "torch.utils.cpp_extension")
_WARNINGS = ("fast_hadamard_transform package not found",)


@contextlib.contextmanager
def third_party_notes_off():
    """The named loggers at ERROR and the named warnings ignored, for the duration of the block."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for message in _WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def native_stderr_captured():
    """What native code writes to file descriptor 2 during the block goes to a temporary file, and is
    written back to stderr only if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
