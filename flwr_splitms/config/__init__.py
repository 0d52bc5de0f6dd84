"""Run configuration of a SplitFed experiment: one typed record for Flower's run-config.

The example app, the local engine, the presets in ``strategies/`` and the notebooks all read the
same keys, so a preset that works in ``flwr run`` works in a notebook too. Keys use Flower's
hyphenated style (``codec-ratio``); attributes use underscores (``codec_ratio``).

Check a run-config without Flower (Flower rejects an unknown key before the app runs, without
naming it)::

    python -m flwr_splitms.config 'codec="ms" codec-ratio=0.95 steps-per-round=20'
"""

from .codec_keys import codec_param_specs, grad_codec_param_specs
from .record import AGGREGATORS, LR_SCHEDULES, ConfigError, SplitConfig, validate

__all__ = [
    "AGGREGATORS",
    "LR_SCHEDULES",
    "ConfigError",
    "SplitConfig",
    "codec_param_specs",
    "grad_codec_param_specs",
    "validate",
]
