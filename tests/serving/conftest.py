"""The serving lane runs only where vLLM is installed (its own environment: `bash .ci/serving`).

The main test run never collects it: in an environment without vLLM these files are not even imported.
"""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") is not None else ["*.py"]
