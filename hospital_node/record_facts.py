"""What the hospital knows that a case record must agree with (see :mod:`gateway.cases.facts`).

- ``data_confirmation`` (§4.5): every entry of ``data.studies`` is the de-identified Study
  Instance UID of a confirmation of *this* hospital, for *this* case, to the case's
  manufacturer, under which at least one instance was released; ``data.confirmation_id``,
  if given, is one of those confirmations and confirms one of the named studies.
- ``order`` (§5.2.2, §5.6): ``data.patient.pseudonym`` is the pseudonym this hospital's
  vault issued for the case (the one its released instances carry).

Messages name the field and why; never the value given (it could be anything typed).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from gateway.cases.facts import RecordFacts

if TYPE_CHECKING:
    from hospital_node.release_store import Confirmation, ReleaseStore
    from hospital_node.vault import PseudonymVault


class HospitalRecordFacts:
    """The hospital's fact check of case records (a :data:`gateway.cases.facts.FactCheck`)."""

    def __init__(self, vault: PseudonymVault, releases: ReleaseStore) -> None:
        self.vault, self.releases = vault, releases

    def __call__(self, ctx: RecordFacts) -> None:
        if ctx.record.type == "data_confirmation":
            self._data_confirmation(ctx)
        elif ctx.record.type == "order":
            self._order(ctx)

    def released(self, case_id: str, manufacturer: str) -> dict[str, list[Confirmation]]:
        """Confirmations of ``case_id`` to ``manufacturer`` that released at least one
        instance, by the de-identified study UID they released."""
        out: dict[str, list[Confirmation]] = {}
        for c in self.releases.confirmations_for_case(case_id, manufacturer):
            if not any(r.status == "released" for r in self.releases.releases(c.confirmation_id)):
                continue
            try:
                deid_uid = str(json.loads(c.record).get("deid_study_uid", ""))
            except ValueError:
                continue
            out.setdefault(deid_uid, []).append(c)
        return out

    def _data_confirmation(self, ctx: RecordFacts) -> None:
        data, case, to = ctx.record.data, ctx.case_id, ctx.manufacturer
        released = self.released(case, to)
        if not released:
            raise ctx.refuse(
                "studies",
                f"names studies, but hospital {ctx.node_id} has released no study for case "
                f"{case} to {to}; confirm a study first (yigong study confirm STUDY_UID "
                f"--case {case} --to {to})",
            )
        for n, uid in enumerate(data["studies"]):
            if uid not in released:
                raise ctx.refuse(
                    f"studies[{n}]",
                    f"is not the de-identified UID of a study hospital {ctx.node_id} released "
                    f"for case {case} to {to}; 'yigong study show' lists it under the "
                    "confirmation",
                )
        wanted = data.get("confirmation_id")
        if wanted is None:
            return
        for uid, confirmations in released.items():
            if any(c.confirmation_id == wanted for c in confirmations):
                if uid not in data["studies"]:
                    raise ctx.refuse(
                        "confirmation_id", "confirms a study that data.studies does not name"
                    )
                return
        raise ctx.refuse(
            "confirmation_id",
            f"is not a confirmation of hospital {ctx.node_id} that released a study for case "
            f"{case} to {to}",
        )

    def _order(self, ctx: RecordFacts) -> None:
        issued = self.vault.issued_pseudonym(ctx.case_id, ctx.manufacturer)
        if issued is None:
            raise ctx.refuse(
                "patient.pseudonym",
                f"cannot be the case's: the pseudonym vault of {ctx.node_id} issued none for "
                f"case {ctx.case_id} (a study is confirmed for the case first)",
            )
        if ctx.record.data["patient"]["pseudonym"] != issued:
            raise ctx.refuse(
                "patient.pseudonym",
                f"is not the pseudonym the vault of {ctx.node_id} issued for case "
                f"{ctx.case_id}; 'yigong study show' gives the case's pseudonym",
            )
