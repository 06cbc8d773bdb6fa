"""The domain: users, signing keys, access tokens and refresh-token families.

Plain Python: no gRPC types here, and no SQL: the domain reads and writes through the
ports it declares (`ports.py`), which the store implements.
"""
