"""``mome web``: MoME in the browser, on Kitware's trame-slicer (Slicer's own views in a web page).

The pieces, front to back:

* :mod:`.cli` adds ``mome web`` to the command line; it imports neither trame nor Slicer until run.
* :mod:`.front` is the HTTP front (aiohttp): the access key, one session per browser visit, and a
  reverse proxy that passes each session's page, websocket, uploads and downloads to its process.
* :mod:`.sessions` starts, watches and ends the session processes; each has its own temporary
  folder, removed when the session ends.
* :mod:`.uploads` checks an uploaded scan (size, format, voxel count) with the library's readers.
* The page itself, one process per session, is ``MoMESlicer.web_app`` beside the Slicer module: it
  holds the MRML scene and drives the segmentation worker through
  :class:`~MoMESegmentationLib.slicer_workflow.SegmentationWorkflow`, as the Slicer panel does.

Nothing in this package imports trame, VTK or Slicer at import time.
"""

#: What ``mome web`` needs beyond the library, as pip installs it (see docs/WEB.md).
INSTALL_HINT = ("pip install 'MoMESegmentation[web]' && pip install --no-deps slicer-layer-dm==2.0.0")
