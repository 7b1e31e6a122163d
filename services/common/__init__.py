"""Shared runtime of every Mercato service: bootstrap, settings, interceptors, health,
metrics, logging, thread configuration and the local supervisor."""
