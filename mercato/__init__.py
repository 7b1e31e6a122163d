"""Mercato: real-time retail personalization over gRPC.

Callers import the generated API from :mod:`mercato.v1` and the typed gateway client
from :mod:`mercato.client`.
"""

__version__ = "0.1.0"
