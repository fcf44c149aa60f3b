"""rayedit: distributed knowledge-editing campaigns on Ray."""

__version__ = "0.1.0"
