"""The module's Slicer-side code that needs no Qt: the scene layer, the Segment Editor effect's core
and offscreen rendering.

It imports ``slicer`` and ``vtk`` (MRML, Logic), so it lives beside the module, not in the library
(``MoMESegmentationLib`` imports without Slicer). It runs inside 3D Slicer and, for tests and
scripts, on Slicer's MRML core from PyPI (``slicer-core``; see ``MoMESlicer.slicer_core``).
Put the ``MoMESegmentation/`` folder on ``sys.path`` to import it outside Slicer (the tests'
conftest does).
"""
