"""smtp-bridge: an SMTP server that turns mail into AOTsend template API calls."""

__all__ = ["__version__"]

__version__ = "0.1.0"
