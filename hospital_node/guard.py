"""The hospital's send-side guard (invariant 2) and receipt check (invariant 4).

:meth:`OutgoingGuard.check_outgoing` runs before an object is accepted for sending and
before *every* send attempt. An object is treated as DICOM when its media type says so
or when its bytes look like DICOM whatever it is called (``DICM`` at offset 128, or a
bare data set starting with a group 0002/0008 element), because a careless or hostile
upload may arrive as ``application/octet-stream``. A DICOM object is re-parsed from the
store and re-scanned (:func:`hospital_node.deid.scan_for_identifiers`) against the
pseudonym its case was released under to that destination (per patient and destination,
:mod:`hospital_node.vault`); any finding refuses the send naming the attributes (never
their values). A pass is remembered by (SHA-256, pseudonym), also when the release's
de-identification worker scanned the very bytes it produced
(:meth:`OutgoingGuard.vouch`), so later send attempts do not read the object again. Even
a clean DICOM object is refused unless this node's release produced it for that
destination after a clinician's confirmation. Every other object goes to the outbound
gate (:class:`hospital_node.outbound.OutboundGate`): case records, and files of an
allowed type whose content passes the scan for the case patient's identifiers.

:meth:`OutgoingGuard.check_receipt` compares the receiver's receipt facts for a released
instance (SOP Instance UID, pixel and geometry hashes) with what the release recorded.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping

from pydicom import dcmread

from gateway.catalog import ObjectRecord
from gateway.errors import IdentifiableData, ReceiptError, ValidationError
from gateway.fidelity.dicom import (
    FACT_GEOMETRY_SHA256,
    FACT_PARSE_ERROR,
    FACT_PIXEL_SHA256,
    FACT_SOP_INSTANCE_UID,
)
from gateway.fidelity.sniff import looks_like_dicom
from gateway.storage import ObjectStore
from hospital_node.deid import scan_for_identifiers
from hospital_node.outbound import OutboundGate
from hospital_node.release_store import ReleaseStore
from hospital_node.vault import PseudonymVault

log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
MAX_LISTED = 25
REMEMBER_CLEAN = 8192
"""Objects whose scan passed, remembered by (SHA-256, pseudonym): a send attempt of one
of them does not read and parse it again (its bytes cannot change under its id)."""
_HEAD_BYTES = 132


def is_dicom_media_type(media_type: str) -> bool:
    return media_type.split(";", 1)[0].strip().lower() == DICOM_MEDIA_TYPE


def read_object(store: ObjectStore, object_id: str) -> bytes:
    """The whole object (DICOM instances are small enough to hold in memory)."""
    with store.open_read(object_id) as chunks:
        return b"".join(chunks)


class OutgoingGuard:
    def __init__(
        self, vault: PseudonymVault, records: ReleaseStore, gate: OutboundGate | None = None
    ) -> None:
        self.vault = vault
        self.records = records
        self.gate = gate
        self._clean: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._clean_lock = threading.Lock()

    def vouch(self, object_id: str, pseudonym: str) -> None:
        """Remember that object ``object_id`` passed :func:`scan_for_identifiers` against
        ``pseudonym`` (the release's worker scanned exactly these bytes)."""
        with self._clean_lock:
            self._clean[(object_id, pseudonym)] = None
            self._clean.move_to_end((object_id, pseudonym))
            while len(self._clean) > REMEMBER_CLEAN:
                self._clean.popitem(last=False)

    def _known_clean(self, object_id: str, pseudonym: str) -> bool:
        with self._clean_lock:
            if (object_id, pseudonym) in self._clean:
                self._clean.move_to_end((object_id, pseudonym))
                return True
        return False

    def is_dicom(self, obj: ObjectRecord, store: ObjectStore) -> bool:
        if is_dicom_media_type(obj.media_type):
            return True
        with store.open_read(obj.object_id, 0, _HEAD_BYTES) as chunks:
            head = next(chunks, b"")
        return looks_like_dicom(head)

    def check_outgoing(self, obj: ObjectRecord, store: ObjectStore, peer: str) -> None:
        """Raise IdentifiableData unless ``obj`` may leave the hospital for ``peer``."""
        if not self.is_dicom(obj, store):
            if self.gate is not None:
                self.gate.check(obj, store, peer)
            return
        oid = obj.object_id
        try:
            pseudonym = self.vault.pseudonym(obj.case_id, peer)
        except ValidationError as exc:
            raise IdentifiableData(
                f"DICOM object {oid} has no valid case id, so it cannot have been "
                "de-identified by this node; not sent. Studies leave the hospital only "
                "through a clinician's confirmation ('yigong study confirm')"
            ) from exc
        findings: list[str] = []
        if not self._known_clean(oid, pseudonym):
            data = read_object(store, oid)
            try:
                ds = dcmread(io.BytesIO(data), force=True)
                findings = scan_for_identifiers(ds, pseudonym)
            except Exception as exc:
                raise IdentifiableData(
                    f"object {oid} looks like DICOM but cannot be parsed ({type(exc).__name__})"
                    "; it cannot be checked for patient data and is not sent"
                ) from exc
            if not findings:
                self.vouch(oid, pseudonym)
        if findings:
            listed = "; ".join(findings[:MAX_LISTED])
            more = f"; and {len(findings) - MAX_LISTED} more" if len(findings) > MAX_LISTED else ""
            raise IdentifiableData(
                f"object {oid} still carries patient-identifying attributes and is not sent "
                f"to {peer}: {listed}{more}. Studies leave the hospital only de-identified, "
                "through a clinician's confirmation ('yigong study confirm')"
            )
        released = self.records.released_facts(oid)
        if released is None:
            raise IdentifiableData(
                f"DICOM object {oid} was not produced by this node's de-identification; not "
                f"sent to {peer}. Studies leave the hospital only through a clinician's "
                "confirmation ('yigong study confirm')"
            )
        if peer not in released.destinations:
            raise IdentifiableData(
                f"DICOM object {oid} was released for {', '.join(sorted(released.destinations))}"
                f", not for {peer}; a clinician must confirm the study for {peer} first"
            )

    def check_receipt(
        self, obj: ObjectRecord, facts: Mapping[str, str], store: ObjectStore
    ) -> None:
        """Raise ReceiptError when the receiver's DICOM facts differ from what was released."""
        released = self.records.released_facts(obj.object_id)
        if released is None:
            if is_dicom_media_type(obj.media_type):
                raise ReceiptError(f"no release record for DICOM object {obj.object_id}")
            return
        if FACT_PARSE_ERROR in facts:
            raise ReceiptError(
                f"the receiver could not parse DICOM object {obj.object_id} "
                f"({FACT_PARSE_ERROR}: {facts[FACT_PARSE_ERROR][:200]})"
            )
        for fact, ours in (
            (FACT_SOP_INSTANCE_UID, released.sop_instance_uid),
            (FACT_PIXEL_SHA256, released.pixel_sha256),
            (FACT_GEOMETRY_SHA256, released.geometry_sha256),
        ):
            theirs = facts.get(fact)
            if theirs is None:
                raise ReceiptError(
                    f"the receipt for DICOM object {obj.object_id} lacks the fact {fact}"
                )
            if theirs != ours:
                raise ReceiptError(
                    f"receipt fact {fact} for object {obj.object_id} is {theirs[:100]!r}, "
                    f"but this node released {ours!r}"
                )
