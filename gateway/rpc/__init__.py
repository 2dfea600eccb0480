"""gRPC boundary of the core: the wire adapters.

- servicers: :mod:`~gateway.rpc.servicers` (Exchange, Query, Transfer),
  :mod:`~gateway.rpc.cases_service` (Cases), :mod:`~gateway.rpc.witness` (Audit)
- clients: :mod:`~gateway.rpc.client` (``NodeClient``), :mod:`~gateway.rpc.cases_client`,
  :mod:`~gateway.rpc.peer_link` (node to node), :mod:`~gateway.rpc.witness`
  (``GrpcWitnessLink``); :mod:`~gateway.rpc.call` the one RPC-call wrapper
- edge: :mod:`~gateway.rpc.auth` (gatekeeper), :mod:`~gateway.rpc.channel`,
  :mod:`~gateway.rpc.terminator` (TLS), :mod:`~gateway.rpc.status` (the one translator
  between :mod:`gateway.errors` and gRPC status codes), :mod:`~gateway.rpc.wire`
  (protobuf messages <-> domain records)

Only this package, the CLI (:mod:`gateway.cli`) and the exemptions listed in
tests/test_import_graph.py (``WIRE_EXEMPT``) import grpc. Servicers translate wire
messages into domain calls and domain errors into status codes.
"""
