"""qlm-plugin's own test run walks into this folder (its testpaths include integration/); the
example's tests need the example installed, which integration/test_example_adapter.py does."""

from __future__ import annotations

import importlib.util

collect_ignore = [] if importlib.util.find_spec("qlm_example_adapter") else ["tests"]
