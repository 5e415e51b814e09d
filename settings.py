"""The settings, as the mission's layout names them; declared and validated in imgserve/settings.py."""

from imgserve.settings import Settings, SettingsError, load

__all__ = ["Settings", "SettingsError", "load"]
