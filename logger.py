"""Logging, as the mission's layout names it; the code is imgserve/logger.py."""

from imgserve.logger import get, setup, untrusted

__all__ = ["get", "setup", "untrusted"]
