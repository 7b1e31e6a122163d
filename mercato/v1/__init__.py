"""Generated gRPC stubs of the Mercato v1 API (``make protos`` regenerates them)."""
