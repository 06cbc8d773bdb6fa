"""authsvc: an authentication microservice (gRPC auth.v1, PostgreSQL)."""
