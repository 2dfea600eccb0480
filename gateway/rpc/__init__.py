"""gRPC boundary: channels, the authentication interceptor and thin servicers.

Only this package (and the CLI) imports grpc. Servicers translate wire
messages into domain calls and domain errors into status codes
(:mod:`gateway.rpc.status`).
"""
