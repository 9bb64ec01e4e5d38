"""Fuzz suite (issue 3): message decoding, the witness state machine, GPS decoding.

Two budgets, as Hypothesis settings profiles registered by ``conftest.py``:

* ``fuzz-ci`` (default): the whole ``tests/fuzz`` directory in well under a minute.
* ``fuzz-long``: about 50 times more inputs, for a run by hand: ``FANNY_FUZZ=long``.

The profiles are *not* named ``ci``/``long`` and are never loaded globally: Hypothesis loads a
profile named ``ci`` by itself when it detects a CI machine, and a global profile would change the
budget of every other Hypothesis test in the repository. Each fuzz test takes its settings from
:func:`fuzz_settings` instead.

Every fuzz test counts the inputs it tried (:func:`tried`) and prints
``fuzz: NAME: N inputs`` when done (:func:`report`); ``conftest.py`` repeats the totals in the
terminal summary so that ``docs/reliability.md`` can quote them.
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

PROFILE_ENV = "FANNY_FUZZ"
"""Environment variable choosing the budget: ``long`` for the run by hand, else the CI one."""
LONG_FACTOR = 50
"""How many times more inputs ``FANNY_FUZZ=long`` tries."""
CI_EXAMPLES = 100
"""Hypothesis examples per fuzz test at weight 1 in the CI profile."""

COUNTS: Counter[str] = Counter()
"""Inputs tried per fuzz test name in this process (module-level, read by the summary)."""


def register_profiles() -> None:
    """Register the ``fuzz-ci`` and ``fuzz-long`` profiles (idempotent)."""
    common = {
        "deadline": None,
        "print_blob": True,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                  HealthCheck.filter_too_much],
    }
    settings.register_profile("fuzz-ci", max_examples=CI_EXAMPLES, **common)
    settings.register_profile("fuzz-long", max_examples=CI_EXAMPLES * LONG_FACTOR, **common)


def profile_name() -> str:
    """``fuzz-long`` when ``FANNY_FUZZ=long``, else ``fuzz-ci``."""
    return "fuzz-long" if os.environ.get(PROFILE_ENV, "").strip() == "long" else "fuzz-ci"


def is_long() -> bool:
    """True for the run by hand (``FANNY_FUZZ=long``)."""
    return profile_name() == "fuzz-long"


def fuzz_settings(weight: float = 1.0, **overrides: object) -> settings:
    """Settings of the active fuzz profile with ``weight`` times its ``max_examples``.

    Args:
        weight: relative budget of this test (cheap properties get more examples).
        overrides: any other Hypothesis setting (``stateful_step_count`` ...).
    """
    register_profiles()
    parent = settings.get_profile(profile_name())
    examples = max(1, round(parent.max_examples * weight))
    return settings(parent, max_examples=examples, **overrides)  # type: ignore[arg-type]


def scaled(count: int) -> int:
    """``count`` for CI, ``LONG_FACTOR`` times it for the long run (plain loops, not Hypothesis)."""
    return count * LONG_FACTOR if is_long() else count


def tried(name: str, n: int = 1) -> None:
    """Count ``n`` inputs tried by the fuzz test ``name``."""
    COUNTS[name] += n


def report(name: str, detail: str = "") -> int:
    """Print ``fuzz: NAME: N inputs`` (then `` (detail)`` if given) and return N.

    Raises:
        AssertionError: the test tried no input at all (a fuzz test that cannot fail).
    """
    n = COUNTS[name]
    print(f"fuzz: {name}: {n} inputs" + (f" ({detail})" if detail else ""))
    assert n > 0, f"fuzz test {name} tried no input"
    return n
