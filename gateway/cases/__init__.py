"""The case workflow of the standard: signed case records, stage gates, both nodes' chains.

- :mod:`gateway.cases.records`  record and envelope format, canonical encoding, hashes
- :mod:`gateway.cases.schema`   the fields of each record type
- :mod:`gateway.cases.workflow` the stage gates (who signs what, in which order)
- :mod:`gateway.cases.chain`    catalog tables and verification of a whole chain
- :mod:`gateway.cases.service`  CaseService: open, submit, show, list, next actor
- :mod:`gateway.cases.sync`     records from the other node (receipt facts hook)
- :mod:`gateway.cases.signing`  the person's side: build and sign a record
The wire lives in the wire folders: the ``yigong.v1.Cases`` servicer
:mod:`gateway.rpc.cases_service`, its client :mod:`gateway.rpc.cases_client` and the
``yigong case`` commands :mod:`gateway.cli.cases`; nothing here imports grpc.

Mapping to the standard's sections: docs/standard-mapping.md.
"""

from gateway.cases.records import CASE_MEDIA_TYPE
from gateway.cases.service import CaseService
from gateway.cases.sync import case_facts_hook
from gateway.cases.views import CaseView, RecordView
from gateway.cases.workflow import STAGES, NextAction

__all__ = [
    "CASE_MEDIA_TYPE",
    "STAGES",
    "CaseService",
    "CaseView",
    "NextAction",
    "RecordView",
    "case_facts_hook",
]
