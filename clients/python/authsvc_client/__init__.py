"""Calling authsvc from Python: client, interceptor and generated stubs."""
