"""thinwatchd: keep device-mapper thin pools on loopback files alive and growing."""

__version__ = "0.1.0"
