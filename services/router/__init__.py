"""The public API: validation, admission, replica sessions, streaming."""
