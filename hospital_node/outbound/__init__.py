"""What may leave a hospital, and how it is checked (issue #16).

- :mod:`.gate` — the decision for everything that is not DICOM (allowed types,
  archives, DICOM anywhere refused), called by :class:`hospital_node.guard.OutgoingGuard`;
- :mod:`.identifiers` — the case's real patient as byte patterns to search for;
- :mod:`.scanners` — where inside a PDF, PNG, JPEG, STL, OBJ, PLY or 3MF to look;
- :mod:`.archives` — archive members, unpacked one at a time, bounded.
"""

from hospital_node.outbound.gate import ALLOWED_MEDIA_TYPES, OutboundGate, OutboundLimits
from hospital_node.outbound.identifiers import IdentifierMatcher, case_identifiers

__all__ = [
    "ALLOWED_MEDIA_TYPES",
    "IdentifierMatcher",
    "OutboundGate",
    "OutboundLimits",
    "case_identifiers",
]
