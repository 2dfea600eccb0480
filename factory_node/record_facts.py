"""What the factory knows that a case record from the hospital must agree with
(see :mod:`gateway.cases.facts`). Checked when the record *arrives*; the factory's own
engineers' records are checked by the core (design files) and the stage gates.

- ``data_confirmation``: every entry of ``data.studies`` is a study this factory received
  for the case. A study still on its way makes the record wait (it is placed when an
  object of the case arrives). ``data.confirmation_id`` names a confirmation the hospital
  keeps; the factory cannot see it and leaves it to the hospital's check.
- ``order``: ``data.patient.pseudonym`` is the Patient ID the de-identified instances
  received for the case carry (the hospital's vault pseudonym of the case).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from pydicom import dcmread

from gateway.cases.facts import RecordFacts
from gateway.errors import YigongError

if TYPE_CHECKING:
    from factory_node.studies import StudyStore
    from gateway.storage import ObjectStore

MAX_STUDIES = 1000
_PATIENT_ID = 0x00100020


class FactoryRecordFacts:
    """The factory's fact check of arriving case records."""

    def __init__(self, studies: StudyStore, store: ObjectStore) -> None:
        self.studies, self.store = studies, store

    def __call__(self, ctx: RecordFacts) -> None:
        if not ctx.arriving:
            return
        if ctx.record.type == "data_confirmation":
            received = {s.study_uid for s in self.studies.list_studies(ctx.case_id, MAX_STUDIES)}
            for n, uid in enumerate(ctx.record.data["studies"]):
                if uid not in received:
                    raise ctx.wait(
                        f"studies[{n}]", f"names a study not received for case {ctx.case_id} yet"
                    )
        elif ctx.record.type == "order":
            carried = self.pseudonyms(ctx.case_id)
            if not carried:
                raise ctx.wait(
                    "patient.pseudonym", f"no study of case {ctx.case_id} has arrived to check it"
                )
            if ctx.record.data["patient"]["pseudonym"] not in carried:
                raise ctx.refuse(
                    "patient.pseudonym",
                    f"is not the pseudonym the studies received for case {ctx.case_id} carry",
                )

    def pseudonyms(self, case_id: str) -> set[str]:
        """The Patient IDs of one received instance of each study of the case."""
        out: set[str] = set()
        for s in self.studies.list_studies(case_id, MAX_STUDIES):
            for inst in self.studies.instances(case_id, s.study_uid):
                if inst.parse_error:
                    continue
                try:
                    with self.store.open_read(inst.object_id) as chunks:
                        data = b"".join(chunks)
                    ds = dcmread(io.BytesIO(data), stop_before_pixels=True,
                                 specific_tags=[_PATIENT_ID])  # fmt: skip
                    out.add(str(ds.get("PatientID", "") or "").strip())
                except (YigongError, Exception):  # unreadable here: try the next instance
                    continue
                break
        return out
