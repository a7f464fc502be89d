"""The gateway's API keys are services.common.auth's (one implementation, shared with the web front);
this name stays for code that still imports it from here."""

from services.common.auth import Identity, KeyFileError, KeyRing, key_from_metadata, parse_keys

__all__ = ["Identity", "KeyFileError", "KeyRing", "key_from_metadata", "parse_keys"]
