"""The hospital role's wire adapters: DICOM (the SCP :mod:`~hospital_node.wire.scp`,
the PACS SCU :mod:`~hospital_node.wire.pacs_scu`, the DIMSE status translator
:mod:`~hospital_node.wire.dimse`), the ``yigong.v1.Hospital`` gRPC servicer
(:mod:`~hospital_node.wire.service`) and the ``yigong study`` commands
(:mod:`~hospital_node.wire.cli`).

Each translates wire <-> domain call <-> wire; the domain (the rest of
``hospital_node/``) never imports grpc, pynetdicom or argparse, nor this package
(tests/test_import_graph.py). :mod:`hospital_node.role` assembles them.
"""
