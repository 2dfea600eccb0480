"""Verified transfer: chunked streaming with SHA-256 per chunk and per object,
resume from the last verified offset, signed receipts, a durable outbox."""
