"""docs/reliability.md is generated from the tests; it must be the current output of tools/reliability.py."""

from __future__ import annotations

import subprocess
import sys

from _classify_utils import ROOT


def test_reliability_table_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "reliability.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
