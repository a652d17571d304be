"""rsq.runtime is numpy only: it imports (and says so clearly for the rest of rsq) with torch blocked."""
import subprocess
import sys

BLOCKED = "import sys; sys.modules['torch'] = None\n"


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED + code], capture_output=True, text=True, timeout=60)


def test_runtime_imports_with_torch_blocked():
    done = run_without_torch(
        "import rsq.runtime, rsq.runtime.packed, rsq.runtime.fixedpoint\n"
        "from rsq.runtime import Runtime, load, IntegerModel\n"
        "assert sys.modules['torch'] is None\n"
        "print('ok')\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_torch_based_names_say_they_need_torch():
    done = run_without_torch(
        "import rsq\n"
        "try:\n    rsq.convert\nexcept ImportError as e:\n    print(e)\n")
    assert done.returncode == 0, done.stderr
    assert "needs PyTorch" in done.stdout
