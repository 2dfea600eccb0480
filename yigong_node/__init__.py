"""The composition root: where a node is put together, above the core and its roles.

``gateway/`` (the shared core) and the role packages ``hospital_node/`` and
``factory_node/`` never build a node or assemble the command line; this package does:

- :mod:`yigong_node.roles`   the role registry (each role package's ``registration.ROLE``)
- :mod:`yigong_node.compose` :func:`build_node`: every service of one node, in dependency
  order, each given only what it uses
- :mod:`yigong_node.cli`     the ``yigong`` command: the core's command groups and the
  roles' groups from the registry

The layers and the build order are drawn in docs/architecture.md;
tests/test_import_graph.py keeps them (no import cycle, no role imported by the core).

Nothing is imported here: ``yigong`` must set ``GRPC_VERBOSITY`` (:mod:`gateway.cli`)
before anything imports grpc, and importing this package comes first.
"""
