"""Format-aware fidelity checks shared by sender and receiver.

- :mod:`gateway.fidelity.dicom` — ``geometry_hash`` and ``pixel_hash`` of DICOM
  instances (invariant 4, "Geometry is sacred").
- :mod:`gateway.fidelity.dicom_raw` — the one home of raw DICOM bytes: VR table, element
  and item headers, the data set walk, File Meta reading and encoding.

Submodules are imported explicitly so that a node only loads the format libraries
it needs.
"""
