"""Compatibility: the presets moved to `exporter.models.presets`."""
from exporter.models.presets import *  # noqa: F401,F403
from exporter.models.presets import PRESETS, preset_config, load_config_file, validate_sao_family  # noqa: F401
