"""One browser session of ``mome web``: Slicer's scene and views (trame-slicer) and the segmentation panel.

``mome web`` (:mod:`MoMESegmentationLib.web.front`) starts one such process per browser visit and
passes the browser's page, websocket, uploads and downloads to it. The process holds:

* a trame-slicer :class:`~trame_slicer.core.SlicerApp` (MRML scene, application logic, module
  logics) and the four-up layout of Slicer's slice and 3D views, rendered here and streamed;
* a :class:`~MoMESegmentationLib.slicer_workflow.SegmentationWorkflow` with its worker process and
  :class:`~MoMESlicer.scene.SlicerScene`, exactly as the Slicer module drives them: the page never
  waits for the network, a crashed or killed worker fails one job, and a new prompt on the same
  scan reuses the worker's cached features;
* its session folder (uploads, job files, results), removed when the process ends.

Routes added to the session's own server (the front adds ``X-MoME-Session``, the session's secret)::

    POST /upload?name=FILE       the scan's bytes; checked, converted to NRRD and shown
    GET  /download/NAME          a result file of the last segmentation

Run by the front as ``python -m MoMESlicer.web_app --session-dir DIR --authKeyFile DIR/secret
--host 127.0.0.1 --port 0 --server``; it writes ``DIR/ready.json`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from MoMESegmentationLib.errors import InputError, MoMEError
from MoMESegmentationLib.resources import resource_path
from MoMESegmentationLib.slicer_workflow import (
    JobState,
    ResultRow,
    SegmentationOptions,
    SegmentationWorkflow,
    completion_terms,
    last_prompt_fragment,
    load_model_cards,
    replace_last_prompt,
    result_rows,
)
from MoMESegmentationLib.web.sessions import SESSION_HEADER
from MoMESegmentationLib.web.uploads import UploadLimits, UploadWriter, prepare_scan, safe_upload_name, server_scans
from MoMESegmentationLib.worker_client import WorkerClient

logger = logging.getLogger("mome.web")

SAMPLE = "sample"
#: Result files offered for download, by the suffix after the result's stem.
RESULT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".json")
POLL_INTERVAL_S = 0.1

#: Sent to the page once: uploads go by HTTP (fetch), not through the websocket.
UPLOAD_SCRIPT = """
(function () {
  function install() {
    if (!(window.trame && window.trame.utils)) { setTimeout(install, 50); return; }
    window.trame.utils.mome = {
      upload(files) {
        const file = Array.isArray(files) ? files[0] : files;
        if (!file) { return; }
        const state = window.trame.state;
        state.set("error", "");
        state.set("status", "Uploading " + file.name + " ...");
        fetch("upload?name=" + encodeURIComponent(file.name), { method: "POST", body: file })
          .then((r) => r.json().catch(() => ({ ok: r.ok, error: "the server answered " + r.status })))
          .then((answer) => { if (!answer.ok && answer.error) { state.set("error", answer.error); } })
          .catch((e) => state.set("error", file.name + ": the upload failed (" + e + ")"));
      },
    };
  }
  install();
})();
"""


def _hex(color: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in color)


class WebSession:
    """The trame app of one session."""

    def __init__(self, session_dir: Path, settings: dict, server: Any = None) -> None:
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from MoMESlicer.scene import SlicerScene

        self.dir = Path(session_dir)
        self.settings = settings
        self.limits = UploadLimits(int(settings.get("max_upload_bytes") or 1_000_000_000),
                                   int(settings.get("max_voxels") or 512 * 512 * 1500))
        self.secret = (self.dir / "secret").read_text(encoding="utf-8").strip() if (self.dir / "secret").is_file() else ""
        for name in ("uploads", "scans", "jobs", "results", "static"):
            (self.dir / name).mkdir(exist_ok=True)
        (self.dir / "static" / "mome.js").write_text(UPLOAD_SCRIPT, encoding="utf-8")

        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.server.enable_module({"serve": {"__mome": str(self.dir / "static")}, "scripts": ["__mome/mome.js"]})
        self.state, self.ctrl = self.server.state, self.server.controller

        self.app = SlicerApp()
        register_rca_factories(self.app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.app.scene, self.app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Quad View")

        self.scene = SlicerScene(self.app.scene)
        command = [sys.executable, "-m", "MoMESegmentationLib.cli", "worker"]
        self.workflow = SegmentationWorkflow(WorkerClient(command), self.scene, on_progress=self._on_progress,
                                             on_finished=self._on_finished, temp_root=self.dir / "jobs")
        self.volume_node: Any = None
        self.result_node: Any = None
        self.result_stem = ""
        self._poller: asyncio.Task | None = None

        self.cards = {card.name: card for card in load_model_cards(resource_path("models.json"))}
        self.vocabulary = resource_path("vocabulary.json")
        self.scans = {f"data:{path.name}": path for path in server_scans(settings.get("data_dir"))}
        self._init_state()
        self._build_ui()
        self.ctrl.on_server_bind.add(self._bind_routes)
        self.ctrl.on_server_ready.add(self._on_ready)

    # ------------------------------------------------------------------ state and UI

    def _init_state(self) -> None:
        state = self.state
        state.trame__title = "MoME segmentation"
        state.sources = [{"title": "Bundled sample CT (abdomen)", "value": SAMPLE}] + [
            {"title": f"Server: {key[5:]}", "value": key} for key in self.scans]
        state.source = SAMPLE
        state.volume_name = ""
        state.loading = False
        state.prompt = ""
        state.suggestions = []
        model = str(self.settings.get("model") or "demo")
        choices = [{"title": card.title or name, "value": name} for name, card in self.cards.items()
                   if card.is_present() or name == model]
        if model not in self.cards:
            choices.insert(0, {"title": model, "value": model})
        state.models = choices
        state.model = model
        state.device = str(self.settings.get("device") or "auto")
        state.devices = ["auto", "cpu", "cuda"]
        state.fast = False
        state.largest_component = False
        state.anatomy_guard = True
        state.running = False
        state.progress = 0
        state.status = "Choose a CT, type what to segment, press Segment."
        state.error = ""
        state.headers = list(ResultRow.HEADERS)
        state.rows = []
        state.segments = []
        state.downloads = []
        state.upload_hint = (f"NIfTI, NRRD, MetaImage or zipped DICOM; up to {self.limits.max_upload_bytes / 1e6:.0f} MB "
                             f"and {self.limits.max_voxels / 1e6:.0f} M voxels")
        state.change("prompt")(self._on_prompt)
        state.change("model")(lambda **_: self._on_prompt())

    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v3

        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            self.ui = layout
            layout.title.set_text("MoME segmentation")
            layout.drawer.width = 420
            with layout.toolbar:
                v3.VSpacer()
                html.Div("{{ volume_name }}", id="mome-volume-name", classes="text-body-2 mr-4")
            with layout.drawer:
                with html.Div(classes="pa-3 d-flex flex-column", style="gap: 10px"):
                    v3.VAlert(v_if="error", type="error", density="compact", id="mome-error",
                              text=("error",), closable=True, click_close="error = ''")
                    html.Div("CT", classes="text-subtitle-2")
                    with html.Div(classes="d-flex", style="gap: 8px"):
                        v3.VSelect(v_model=("source",), items=("sources",), density="compact", hide_details=True,
                                   id="mome-source", disabled=("running || loading",))
                        v3.VBtn("Load", click=self.ctrl.load_source, id="mome-load", loading=("loading",),
                                disabled=("running",))
                    v3.VFileInput(label="Upload a scan", density="compact", id="mome-upload",
                                  hint=("upload_hint",), persistent_hint=True, show_size=True,
                                  accept=".nii,.nii.gz,.gz,.nrrd,.mha,.zip", disabled=("running || loading",),
                                  update_modelValue="utils.mome.upload($event)")
                    html.Div("Prompt", classes="text-subtitle-2 mt-2")
                    v3.VTextField(v_model=("prompt",), placeholder="e.g. liver, spleen", density="compact",
                                  hide_details=True, id="mome-prompt", keyup_enter=self.ctrl.segment,
                                  clearable=True)
                    with html.Div(id="mome-suggestions", style="min-height: 28px"):
                        v3.VChip("{{ term }}", v_for="term in suggestions", key="term", size="small",
                                 classes="mr-1 mb-1", click=(self.ctrl.pick_suggestion, "[term]"))
                    with html.Div(classes="d-flex", style="gap: 8px"):
                        v3.VSelect(v_model=("model",), items=("models",), label="Model", density="compact",
                                   hide_details=True, id="mome-model", disabled=("running",))
                        v3.VSelect(v_model=("device",), items=("devices",), label="Device", density="compact",
                                   hide_details=True, style="max-width: 110px", disabled=("running",))
                    with html.Div(classes="d-flex flex-wrap"):
                        v3.VCheckbox(v_model=("fast",), label="Fast", density="compact", hide_details=True)
                        v3.VCheckbox(v_model=("largest_component",), label="Largest part", density="compact",
                                     hide_details=True)
                        v3.VCheckbox(v_model=("anatomy_guard",), label="Anatomy checks", density="compact",
                                     hide_details=True)
                    with html.Div(classes="d-flex", style="gap: 8px"):
                        v3.VBtn("Segment", color="primary", click=self.ctrl.segment, id="mome-segment",
                                disabled=("running || loading || !volume_name || !prompt",))
                        v3.VBtn("Cancel", click=self.ctrl.cancel, id="mome-cancel", disabled=("!running",))
                    v3.VProgressLinear(model_value=("progress",), height=8, id="mome-progress",
                                       color="primary", active=True)
                    html.Div("{{ status }}", id="mome-status", classes="text-body-2")
                    with html.Table(v_if="rows.length", id="mome-results", classes="text-body-2",
                                    style="border-collapse: collapse; width: 100%"):
                        with html.Tr():
                            html.Th("{{ h }}", v_for="h in headers", key="h",
                                    style="text-align: left; border-bottom: 1px solid #ccc; padding: 2px")
                        with html.Tr(v_for="(row, i) in rows", key="i", classes="mome-row"):
                            html.Td("{{ cell }}", v_for="(cell, j) in row", key="j",
                                    style="padding: 2px; border-bottom: 1px solid #eee")
                    with html.Div(v_if="segments.length", id="mome-segments"):
                        html.Div("Segments", classes="text-subtitle-2 mt-2")
                        with html.Div(v_for="(s, i) in segments", key="s.id", classes="d-flex align-center",
                                      style="gap: 6px"):
                            html.Div(style=("{background: s.color, width: '14px', height: '14px', "
                                            "borderRadius: '3px', flex: 'none'}",))
                            v3.VCheckbox(model_value=("s.visible",), density="compact", hide_details=True,
                                         style="flex: none", classes="mome-visible",
                                         update_modelValue=(self.ctrl.set_visible, "[s.id, $event]"))
                            html.Div("{{ s.name }}", style="width: 110px; overflow: hidden; white-space: nowrap")
                            v3.VSlider(model_value=("s.opacity",), min=0, max=1, step=0.05, density="compact",
                                       hide_details=True, classes="mome-opacity",
                                       end=(self.ctrl.set_opacity, "[s.id, $event]"))
                    with html.Div(v_if="downloads.length", id="mome-downloads", classes="d-flex flex-wrap",
                                  style="gap: 8px"):
                        html.A("{{ d.title }}", v_for="d in downloads", key="d.href", href=("d.href",),
                               download=True, classes="text-body-2")
            with layout.content:
                with v3.VContainer(fluid=True, classes="pa-0 fill-height", id="mome-views"):
                    self.layout_manager.initialize_layout_grid(layout)

        self.ctrl.load_source = self.load_source
        self.ctrl.segment = self.segment
        self.ctrl.cancel = self.cancel
        self.ctrl.pick_suggestion = self.pick_suggestion
        self.ctrl.set_visible = self.set_visible
        self.ctrl.set_opacity = self.set_opacity

    # ------------------------------------------------------------------ life cycle

    def _on_ready(self, **_: Any) -> None:
        port = self.server.port
        ready = self.dir / "ready.json"
        ready.with_suffix(".tmp").write_text(json.dumps({"port": port}), encoding="utf-8")
        ready.with_suffix(".tmp").replace(ready)
        self._poller = asyncio.get_event_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                if self.workflow.client.is_running or self.workflow.busy:
                    with self.state:
                        self.workflow.process_events()
            except Exception:  # the page must keep working whatever one event did
                logger.exception("handling worker events failed")
            await asyncio.sleep(POLL_INTERVAL_S)

    def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        try:
            self.workflow.shutdown()
        except Exception:
            logger.exception("stopping the worker failed")

    # ------------------------------------------------------------------ routes

    def _bind_routes(self, wslink_server: Any) -> None:
        from aiohttp import web

        def allowed(request: Any) -> bool:
            return not self.secret or hmac.compare_digest(request.headers.get(SESSION_HEADER, "").encode(),
                                                          self.secret.encode())

        async def upload(request: Any) -> Any:
            if not allowed(request):
                return web.json_response({"ok": False, "error": "not this session"}, status=403)
            answer, status = await self.receive_upload(request.query.get("name", ""), request.content,
                                                       request.content_length)
            return web.json_response(answer, status=status)

        async def download(request: Any) -> Any:
            if not allowed(request):
                raise web.HTTPForbidden()
            name = request.match_info["name"]
            path = self.dir / "results" / name
            if "/" in name or name.startswith(".") or not path.is_file():
                raise web.HTTPNotFound(text=f"{name}: no such result (segment first)")
            return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"'})

        wslink_server.app.router.add_post("/upload", upload)
        wslink_server.app.router.add_get("/download/{name}", download)

    # ------------------------------------------------------------------ loading scans

    async def receive_upload(self, name: str, content: Any, length: int | None) -> tuple[dict, int]:
        """Write, check and show an upload; returns the JSON answer and the HTTP status."""
        raw: Path | None = None
        try:
            if self.workflow.busy:
                raise InputError("a segmentation is running: wait for it or cancel it before loading a scan")
            safe = safe_upload_name(name)
            if length is not None and length > self.limits.max_upload_bytes:
                raise InputError(f"{name}: {length / 1e6:.0f} MB, larger than this server's upload limit of "
                                 f"{self.limits.max_upload_bytes / 1e6:.0f} MB")
            with self.state:
                self.state.loading, self.state.error = True, ""
                self.state.status = f"Receiving {name} ..."
            raw = self.dir / "uploads" / safe
            writer = UploadWriter(raw, name, self.limits.max_upload_bytes)
            try:
                async for chunk in content.iter_chunked(1 << 20):
                    writer.write(chunk)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            await self._load_scan(raw, name)
            return {"ok": True, "volume": self.state.volume_name}, 200
        except InputError as error:
            self._show_error(str(error))
            return {"ok": False, "error": str(error)}, 400
        finally:
            if raw is not None:
                raw.unlink(missing_ok=True)
            with self.state:
                self.state.loading = False

    async def load_source(self) -> None:
        source = self.state.source
        try:
            if self.workflow.busy:
                raise InputError("a segmentation is running: wait for it or cancel it before loading a scan")
            if source == SAMPLE:
                from MoMESegmentationLib.data.sample import sample_ct_path

                path, name = sample_ct_path(), "example_ct.nii.gz"
            elif source in self.scans:
                path, name = self.scans[source], self.scans[source].name
            else:
                raise InputError(f"{source}: no such scan")
            with self.state:
                self.state.loading, self.state.error = True, ""
                self.state.status = f"Loading {name} ..."
            await self._load_scan(path, name)
        except InputError as error:
            self._show_error(str(error))
        finally:
            with self.state:
                self.state.loading = False

    async def _load_scan(self, path: Path, name: str) -> None:
        """Check the scan off the event loop, then put it in the scene in place of the previous one."""
        loop = asyncio.get_running_loop()
        folder = self.dir / "scans"
        for old in folder.iterdir():
            if old.is_file():
                old.unlink()
        nrrd = await loop.run_in_executor(None, prepare_scan, path, folder, self.limits, name)
        self.show_volume(nrrd)

    def show_volume(self, nrrd: Path) -> None:
        scene = self.app.scene
        nodes = self.app.io_manager.load_volumes(str(nrrd))
        if not nodes:
            raise InputError(f"{nrrd.name}: Slicer could not read the converted scan")
        for old in (self.result_node, self.volume_node):
            if old is not None and scene.IsNodePresent(old):
                scene.RemoveNode(old)
        self.result_node = None
        self.volume_node = nodes[0]
        self.volume_node.SetName(nrrd.name[: -len(".nrrd")])
        self.app.display_manager.show_volume_in_slice_background(self.volume_node)
        self.app.display_manager.reset_views()
        self._clear_results()
        with self.state:
            self.state.volume_name = self.volume_node.GetName()
            dims = self.volume_node.GetImageData().GetDimensions()
            self.state.status = f"Loaded {self.state.volume_name} ({dims[0]}x{dims[1]}x{dims[2]}). Type a prompt."

    def _clear_results(self) -> None:
        for old in (self.dir / "results").iterdir():
            if old.is_file():
                old.unlink()
        with self.state:
            self.state.rows, self.state.segments, self.state.downloads = [], [], []
            self.state.progress = 0

    # ------------------------------------------------------------------ prompts

    def _structures(self) -> list[str]:
        model = self.state.model
        client = self.workflow.client
        if self.workflow.structures and client.loaded and client.loaded.get("model") == model:
            return self.workflow.structures
        card = self.cards.get(model)
        return list(card.structures) if card else []

    def _on_prompt(self, **_: Any) -> None:
        fragment = last_prompt_fragment(self.state.prompt or "").lower()
        if len(fragment) < 2:
            self.state.suggestions = []
            return
        terms = completion_terms(self._structures(), self.vocabulary)
        starts = [t for t in terms if t.lower().startswith(fragment) and t.lower() != fragment]
        inside = [t for t in terms if fragment in t.lower() and t not in starts and t.lower() != fragment]
        self.state.suggestions = (starts + inside)[:8]

    def pick_suggestion(self, term: str) -> None:
        self.state.prompt = replace_last_prompt(self.state.prompt or "", term) + ", "

    # ------------------------------------------------------------------ segmentation

    def segment(self) -> None:
        state = self.state
        if state.running:
            return
        try:
            if self.volume_node is None:
                raise InputError("no scan loaded: choose the sample, a server scan or an upload first")
            options = SegmentationOptions(model=state.model, device=state.device,
                                          threads=self.settings.get("threads"), fast=bool(state.fast),
                                          largest_component=bool(state.largest_component),
                                          anatomy_guard=bool(state.anatomy_guard))
            self.workflow.start(self.volume_node, state.prompt or "", options=options, importer=self._import)
        except (MoMEError, ValueError) as error:
            self._show_error(str(error))
            return
        state.error = ""
        state.running = True
        state.progress = 0
        state.status = "Starting the segmentation worker ..." if not self.workflow.client.loaded else "Queued ..."

    def cancel(self) -> None:
        if self.workflow.busy:
            self.workflow.cancel()

    def _on_progress(self, job: Any) -> None:
        self.state.progress = round(100 * job.fraction)
        self.state.status = job.message or job.stage or "working ..."

    def _on_finished(self, job: Any) -> None:
        state = self.state
        state.running = False
        if job.state is JobState.DONE:
            state.progress = 100
            rows = result_rows(job.summary)
            state.rows = [list(row.cells()) for row in rows]
            found = sum(row.found for row in rows)
            state.status = f"Done in {job.elapsed_s:.1f} s: {found} of {len(rows)} structures found."
        elif job.state is JobState.CANCELLED:
            state.progress = 0
            state.status = "Cancelled; the views are as before."
        else:
            state.progress = 0
            state.status = "Failed."
            state.error = job.error or "the segmentation failed"

    def _import(self, seg_path: Path, summary: dict, job: Any) -> Any:
        """Show the result in place of the previous one, keep its files for download, centre the views."""
        node = self.scene.import_result(seg_path, summary, None, False, self.volume_node)
        try:
            stem = self._save_results(seg_path, summary)
            node.CreateClosedSurfaceRepresentation()
        except BaseException:
            self.app.scene.RemoveNode(node)
            raise
        if self.result_node is not None and self.app.scene.IsNodePresent(self.result_node):
            self.app.scene.RemoveNode(self.result_node)
        self.result_node = node
        self.result_stem = stem
        self._centre_views(seg_path)
        self._publish_segments()
        self.state.downloads = [{"title": f"{stem}{suffix}", "href": f"download/{stem}{suffix}"}
                                for suffix in RESULT_SUFFIXES]
        return node

    def _save_results(self, seg_path: Path, summary: dict) -> str:
        """``.seg.nrrd``, NIfTI label map and JSON summary into the session's results folder (atomically)."""
        from MoMESegmentationLib.io.readers import write_labelmap
        from MoMESegmentationLib.io.segmentation import read_segmentation
        from MoMESegmentationLib.outputs import atomic_outputs

        stem = f"{self.volume_node.GetName()}_mome"
        folder = self.dir / "results"
        for old in folder.iterdir():
            if old.is_file():
                old.unlink()
        segmentation = read_segmentation(seg_path)
        with atomic_outputs(folder) as staging:
            shutil.copyfile(seg_path, staging / f"{stem}.seg.nrrd")
            write_labelmap(segmentation.labelmap(), segmentation.reference, staging / f"{stem}.nii.gz")
            (staging / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self._segmentation = segmentation
        return stem

    def _centre_views(self, seg_path: Path) -> None:
        """Slice views through the axial slice holding most of the result, 3D camera on the segments."""
        segmentation = getattr(self, "_segmentation", None)
        if segmentation is None or not segmentation.segments:
            return
        union = np.zeros(segmentation.reference.shape, dtype=bool)
        for segment in segmentation.segments:
            union |= segment.mask
        if not union.any():
            return
        direction = np.asarray(segmentation.reference.direction, dtype=float).reshape(3, 3)
        axis = int(np.argmax(np.abs(direction[2, :])))  # the array axis closest to superior
        counts = union.sum(axis=tuple(a for a in range(3) if a != axis))
        index = int(np.argmax(counts))
        points = np.argwhere(np.take(union, index, axis=axis))
        centre = np.insert(points.mean(axis=0), axis, index)
        lps = np.asarray(segmentation.reference.index_to_physical(centre[None, :]), dtype=float).reshape(-1)[:3]
        ras = (-lps[0], -lps[1], lps[2])
        slice_nodes = self.app.scene.GetNodesByClass("vtkMRMLSliceNode")
        for i in range(slice_nodes.GetNumberOfItems()):
            slice_nodes.GetItemAsObject(i).JumpSliceByCentering(*ras)
        for view in self.app.view_manager.get_threed_views():
            view.reset_camera()

    def _publish_segments(self) -> None:
        node = self.result_node
        if node is None:
            self.state.segments = []
            return
        segmentation, display = node.GetSegmentation(), node.GetDisplayNode()
        items = []
        for i in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(i)
            segment = segmentation.GetSegment(segment_id)
            items.append({"id": segment_id, "name": segment.GetName(), "color": _hex(segment.GetColor()),
                          "visible": bool(display.GetSegmentVisibility(segment_id)),
                          "opacity": float(display.GetSegmentOpacity3D(segment_id))})
        self.state.segments = items

    def set_visible(self, segment_id: str, visible: Any) -> None:
        if self.result_node is not None:
            self.result_node.GetDisplayNode().SetSegmentVisibility(segment_id, bool(visible))
            self._publish_segments()

    def set_opacity(self, segment_id: str, opacity: Any) -> None:
        if self.result_node is not None:
            self.result_node.GetDisplayNode().SetSegmentOpacity(segment_id, float(np.clip(float(opacity), 0, 1)))
            self._publish_segments()

    # ------------------------------------------------------------------ messages

    def _show_error(self, message: str) -> None:
        line = message.strip().splitlines()[0] if message.strip() else "unknown error"
        logger.info("shown to the user: %s", line)
        with self.state:
            self.state.error = line
            self.state.status = "Nothing changed."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one session of mome web (started by mome web)")
    parser.add_argument("--session-dir", required=True)
    args, _ = parser.parse_known_args(argv)
    session_dir = Path(args.session_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = json.loads((session_dir / "session.json").read_text(encoding="utf-8"))
    session = None
    started = time.monotonic()
    try:
        session = WebSession(session_dir, settings)
        logger.info("session ready to start in %.1f s", time.monotonic() - started)
        session.server.start(open_browser=False, show_connection_info=False,
                             timeout=int(settings.get("session_timeout_s") or 60))
    finally:
        if session is not None:
            session.close()
        shutil.rmtree(session_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
