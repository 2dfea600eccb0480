"""C-STORE of one instance to the hospital's PACS (the SCU side; pynetdicom lives here).

Thin, like the SCP: :func:`send_to_pacs` opens one association with one presentation
context for the instance's SOP Class (Explicit and Implicit VR Little Endian), sends
the instance, releases, and translates every failure into :mod:`gateway.errors`,
naming the PACS as ``AE@host:port``:

- no TCP connection, or a connection without an association (aborted, timed out) →
  :class:`~gateway.errors.PeerUnavailable` (retry later);
- association rejected, SOP Class not accepted, or a C-STORE failure status →
  :class:`~gateway.errors.TransferError` with the status in hex and the PACS's Error
  Comment (fix the configuration or the instance; retrying will not help);
- no C-STORE response (connection lost, DIMSE timeout) → PeerUnavailable.

Success (0x0000) and the C-STORE warnings (0x0001, 0xB000, 0xB006, 0xB007) return the
status. Logs name the SOP Instance UID and the PACS, never patient data.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from gateway.errors import PeerUnavailable, TransferError, ValidationError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
"""C-STORE warning statuses (PS3.4 B.2.3): the instance was stored."""


def send_to_pacs(
    ds: Dataset,
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "YIGONG",
    timeout: float = 30.0,
) -> int:
    """C-STORE ``ds`` to ``called_ae`` at ``host:port``; return the (success) status."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_class or not sop_instance:
        raise ValidationError("the instance has no SOP Class UID or SOP Instance UID")
    where = f"PACS {called_ae}@{host}:{port}"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    connected: list[bool] = []
    assoc = ae.associate(
        host,
        port,
        ae_title=called_ae,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))],
    )
    if assoc.is_rejected:
        raise TransferError(
            f"{where} rejected the association from {calling_ae}; check the called and "
            "calling AE titles and the PACS's list of known peers"
        )
    if not connected:
        raise PeerUnavailable(
            f"{where} could not be reached (TCP connection refused or not made within "
            f"{timeout:g} s); check that the PACS is running and its host and port; retry later"
        )
    refused = [c for c in assoc.rejected_contexts if c.abstract_syntax == sop_class]
    if refused or (assoc.is_established and not assoc.accepted_contexts):
        if assoc.is_established:
            assoc.release()
        raise TransferError(
            f"{where} does not accept SOP Class {sop_class} ({UID(sop_class).name}); "
            "configure the PACS to store it"
        )
    if not assoc.is_established:
        raise PeerUnavailable(
            f"{where} accepted the connection but no association was established within "
            f"{timeout:g} s (aborted or timed out); retry later"
        )
    try:
        status = assoc.send_c_store(ds)
    except (ValueError, AttributeError) as exc:
        raise ValidationError(
            f"instance {sop_instance} cannot be encoded for {where}: {exc}"
        ) from exc
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        raise PeerUnavailable(
            f"{where} sent no C-STORE response for instance {sop_instance} "
            "(connection lost or DIMSE timeout); retry later"
        )
    code = int(status.Status)
    if code == SUCCESS or code in WARNINGS:
        log.info("instance %s stored on %s (status 0x%04X)", sop_instance, where, code)
        return code
    comment = str(status.get("ErrorComment", "") or "")[:200]
    raise TransferError(
        f"{where} refused instance {sop_instance}: C-STORE status 0x{code:04X}"
        + (f" ({comment})" if comment else "")
    )
