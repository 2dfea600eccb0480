"""The factory role's wire adapters: the ``yigong.v1.Factory`` gRPC servicer
(:mod:`~factory_node.wire.service`) and the ``yigong factory`` commands
(:mod:`~factory_node.wire.cli`).

Each translates wire <-> domain call <-> wire; the domain (the rest of
``factory_node/``) never imports grpc or argparse, nor this package
(tests/test_import_graph.py). :mod:`factory_node.role` assembles them.
"""
