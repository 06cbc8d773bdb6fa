"""gRPC adapters: requests in, responses and statuses out. No business logic here."""
