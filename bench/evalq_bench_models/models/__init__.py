"""lmms-eval reads `AVAILABLE_MODELS` here: each name maps to `<name>.<class>` in this package."""

AVAILABLE_MODELS = {"slow_dummy": "SlowDummy"}
