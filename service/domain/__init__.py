"""The domain: users, signing keys, access tokens and refresh-token families.

Plain Python: no gRPC types here, and no SQL (that lives in `service.store`).
"""
