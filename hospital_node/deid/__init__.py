"""DICOM de-identification of the hospital node (PS3.15 Annex E, Table E.1-1 2024b).

Public API::

    deid = Deidentifier(key)                       # key: hospital-held secret bytes
    result = deid.deidentify(ds, "CASE-0001")      # -> DeidResult (ds untouched)
    data = deid.deidentify_bytes(part10, "CASE-0001")   # same transfer syntax, pixels verbatim
    data, result = deid.deidentify_part10(part10, "CASE-0001")
    findings = scan_for_identifiers(ds, "CASE-0001")   # [] means it may be sent

Raises :class:`BurnedInAnnotationHeld` (a ``ValidationError``) for instances that may
show patient data in their pixels unless ``allow_burned_in=True``, :class:`DeidRefused`
(a ``ValidationError``) for instances that cannot be de-identified into a valid object
(a Content Sequence of SR/KO holding items, ...), and
``gateway.errors.IntegrityError`` if geometry or pixel data would change.
"""

from hospital_node.deid.clean import clean_text
from hospital_node.deid.engine import (
    BurnedInAnnotationHeld,
    Deidentifier,
    DeidRefused,
    DeidResult,
    burned_in_reason,
    date_offset_days,
    map_uid,
)
from hospital_node.deid.profile import (
    TABLE_CITATION,
    TABLE_EDITION,
    Action,
    ConfidentialityProfile,
    Option,
)
from hospital_node.deid.scan import scan_for_identifiers

__all__ = [
    "TABLE_CITATION",
    "TABLE_EDITION",
    "Action",
    "BurnedInAnnotationHeld",
    "ConfidentialityProfile",
    "DeidRefused",
    "DeidResult",
    "Deidentifier",
    "Option",
    "burned_in_reason",
    "clean_text",
    "date_offset_days",
    "map_uid",
    "scan_for_identifiers",
]
