"""authsvc: an authentication microservice (gRPC auth.v1, PostgreSQL)."""

import os

# gRPC's C core writes lines of its own to stderr, outside Python's logging: neither JSON nor
# rate-limited, and a client can cause them at will (one per call whose `grpc-timeout` does
# not parse). They stay off unless the operator asks for them (GRPC_VERBOSITY=ERROR, e.g.
# to debug TLS handshakes). Set here, before anything imports grpc, which reads it once.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
