"""The profile service."""
