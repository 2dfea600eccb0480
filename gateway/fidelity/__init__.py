"""Format-aware fidelity checks shared by sender and receiver.

- :mod:`gateway.fidelity.dicom` — ``geometry_hash`` and ``pixel_hash`` of DICOM
  instances (invariant 4, "Geometry is sacred").

Submodules are imported explicitly so that a node only loads the format libraries
it needs.
"""
