"""Hypothesis settings for the property-based suite (tests/fuzz).

In CI (the default profile, `ci`) every property runs 200 examples from a seed
derived from the test itself, so a run is reproducible and the directory stays well under a
minute. Run deeper by hand:

    MESHAGENT_FUZZ_PROFILE=deep .venv/bin/pytest tests/fuzz            # 5,000 random examples each
    MESHAGENT_FUZZ_EXAMPLES=50000 MESHAGENT_FUZZ_PROFILE=deep .venv/bin/pytest tests/fuzz -k http2
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_COMMON = {
    "deadline": None,  # CI machines are slow and shared: time is not what is tested here
    "database": None,  # nothing written into the work tree
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,  # a failure prints how to reproduce it (@reproduce_failure)
}
settings.register_profile(
    "ci", max_examples=200, derandomize=True, phases=[Phase.explicit, Phase.generate, Phase.shrink], **_COMMON
)
settings.register_profile("deep", max_examples=5000, derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("MESHAGENT_FUZZ_PROFILE", "ci"))
if os.environ.get("MESHAGENT_FUZZ_EXAMPLES"):
    settings.register_profile(
        "custom", settings.default, max_examples=int(os.environ["MESHAGENT_FUZZ_EXAMPLES"])
    )
    settings.load_profile("custom")
