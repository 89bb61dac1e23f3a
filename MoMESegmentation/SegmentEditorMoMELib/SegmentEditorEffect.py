"""The "MoME" Segment Editor effect: compute one structure into the selected segment, see its
confidence, and review where the segment and the model disagree.

Only the Qt glue lives here. What the effect does to the scene is in ``MoMESlicer.correction`` and
``MoMESlicer.segment_editor`` (tested on Slicer's own MRML classes without Qt): every write goes
through the Segment Editor's modifier, so the editable area, the intensity range, the overwrite
mode and Undo / Redo apply as for Slicer's own effects. Inference runs in the MoME Segmentation
module's worker process, with the model, device and options chosen in that module's panel.
"""

import logging
import os

import ctk
import qt

import slicer
from slicer.i18n import tr as _

from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from MoMESegmentationLib.errors import MoMEError
from MoMESegmentationLib.slicer_workflow import JobState
from MoMESlicer.correction import (
    REVIEW_HEADERS,
    ApplySettings,
    LiveThreshold,
    SegmentReview,
    roi_box_ijk,
    export_for_training,
    show_probability,
    slab_at_slice,
    training_labels,
    volume_key,
)
from MoMESlicer.segment_editor import MODES, SegmentEditorParts, segment_prompt

#: Choices of the "Limit to" list: (key, label).
REGIONS = (("volume", _("Whole volume")), ("roi", _("ROI")), ("slab", _("Slab around the current slice")))
MODE_LABELS = {"replace": _("Replace"), "add": _("Add (union)"), "remove": _("Remove (subtract)")}


class EffectEditorParts(SegmentEditorParts):
    """The effect's way into the Segment Editor widget's own logic (masking, undo)."""

    def __init__(self, scriptedEffect):
        self.effect = scriptedEffect

    @property
    def editor_node(self):
        return self.effect.parameterSetNode()

    def save_state_for_undo(self):
        self.effect.saveStateForUndo()

    def undo(self):
        widget = self.effect.optionsFrame()
        while widget is not None and not isinstance(widget, slicer.qMRMLSegmentEditorWidget):
            widget = widget.parent()
        if widget is None or not widget.undoEnabled:
            return False
        widget.undo()
        return True

    def modify(self, segmentationNode, segmentID, modifier, mode):
        self.effect.modifySegmentByLabelmap(segmentationNode, segmentID, modifier,
                                            getattr(slicer.qSlicerSegmentEditorAbstractEffect, mode))

    def reference_geometry(self):
        return self.effect.defaultModifierLabelmap()


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Text-prompted MoME segmentation of the selected segment, with confidence and review."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "MoME"
        scriptedEffect.title = _("MoME")
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.ui = None
        self.job = None
        self.result = None
        self.live = None
        self.review = None
        self.overlayNode = None
        self._promptSegmentID = None
        self._pollTimer = None
        self._thresholdTimer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        from MoMESegmentation import moduleResourcePath

        iconPath = moduleResourcePath("Icons", "MoMESegmentation.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return "<html>" + _(
            "Compute a structure with MoME into the selected segment.<p>"
            "The structure is prefilled from the segment's terminology or name. <b>Apply</b> writes it through the "
            "editor: the editable area, intensity range and overwrite settings apply, and Undo reverts it. "
            "The threshold re-cuts the model's probabilities without new inference. <b>Review</b> lists the regions "
            "where the segment and the model disagree; accept or reject each. The model and device are those of the "
            "MoME Segmentation module.") + "</html>"

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    # ------------------------------------------------------------------ options

    def setupOptionsFrame(self):
        from MoMESegmentation import moduleResourcePath

        uiWidget = slicer.util.loadUI(moduleResourcePath("UI", "SegmentEditorMoME.ui"))
        self.scriptedEffect.addOptionsWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        for mode in MODES:
            self.ui.modeSelector.addItem(MODE_LABELS[mode], mode)
        for key, label in REGIONS:
            self.ui.regionSelector.addItem(label, key)
        self.ui.thresholdSlider.minimum = 0.05
        self.ui.thresholdSlider.maximum = 0.95
        self.ui.thresholdSlider.singleStep = 0.05
        self.ui.thresholdSlider.decimals = 2
        self.ui.thresholdSlider.value = 0.5
        self.ui.datasetPathEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.reviewTable.setColumnCount(len(REVIEW_HEADERS))
        self.ui.reviewTable.setHorizontalHeaderLabels([_(header) for header in REVIEW_HEADERS])

        # A moving slider re-applies at most every 150 ms.
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(150)
        self._thresholdTimer.connect("timeout()", self.onThresholdSettled)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.regionSelector.connect("currentIndexChanged(int)", self.updateRegionWidgets)
        self.ui.modeSelector.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.ui.slabSpinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.showProbabilityCheckBox.connect("toggled(bool)", self.onShowProbability)
        self.ui.findDisagreementsButton.connect("clicked(bool)", self.onFindDisagreements)
        self.ui.reviewTable.connect("itemSelectionChanged()", self.onReviewSelection)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.rejectButton.connect("clicked(bool)", self.onReject)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.updateRegionWidgets()

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("MoME.Mode", "replace")
        self.scriptedEffect.setParameterDefault("MoME.Region", "volume")
        self.scriptedEffect.setParameterDefault("MoME.SlabHalfThickness", 5)

    def updateGUIFromMRML(self):
        if self.ui is None or self.scriptedEffect.parameterSetNode() is None:
            return
        for widget, parameter in ((self.ui.modeSelector, "MoME.Mode"), (self.ui.regionSelector, "MoME.Region")):
            index = widget.findData(self.scriptedEffect.parameter(parameter))
            if index >= 0 and index != widget.currentIndex:
                wasBlocked = widget.blockSignals(True)
                widget.currentIndex = index
                widget.blockSignals(wasBlocked)
        wasBlocked = self.ui.slabSpinBox.blockSignals(True)
        self.ui.slabSpinBox.value = self.scriptedEffect.integerParameter("MoME.SlabHalfThickness")
        self.ui.slabSpinBox.blockSignals(wasBlocked)
        self.prefillPrompt()
        self.updateRegionWidgets()

    def updateMRMLFromGUI(self, *args):
        if self.ui is None or self.scriptedEffect.parameterSetNode() is None:
            return
        self.scriptedEffect.setParameter("MoME.Mode", self.ui.modeSelector.currentData)
        self.scriptedEffect.setParameter("MoME.Region", self.ui.regionSelector.currentData)
        self.scriptedEffect.setParameter("MoME.SlabHalfThickness", self.ui.slabSpinBox.value)

    def updateRegionWidgets(self, *args):
        region = self.ui.regionSelector.currentData
        self.ui.roiSelector.setEnabled(region == "roi")
        self.ui.slabSpinBox.setEnabled(region == "slab")
        self.updateMRMLFromGUI()

    def prefillPrompt(self):
        """The selected segment's structure, when the selection changed (the user's typing is kept otherwise)."""
        node = self.scriptedEffect.parameterSetNode()
        segmentID = node.GetSelectedSegmentID() if node else None
        if not segmentID or segmentID == self._promptSegmentID or node.GetSegmentationNode() is None:
            return
        segment = node.GetSegmentationNode().GetSegmentation().GetSegment(segmentID)
        if segment is not None:
            self.ui.promptEdit.text = segment_prompt(segment)
            self._promptSegmentID = segmentID

    def activate(self):
        self.prefillPrompt()

    def deactivate(self):
        if self.job is not None and not self.job.is_finished:
            self.onCancel()

    def cleanup(self):
        for timer in (self._pollTimer, self._thresholdTimer):
            if timer:
                timer.stop()

    # ------------------------------------------------------------------ apply

    def moduleLogic(self):
        return slicer.util.getModuleLogic("MoMESegmentation")

    def sourceVolume(self):
        node = self.scriptedEffect.parameterSetNode()
        return node.GetSourceVolumeNode() if node else None

    def settings(self, volumeNode):
        region = self.ui.regionSelector.currentData
        settings = ApplySettings(mode=self.ui.modeSelector.currentData, threshold=self.ui.thresholdSlider.value)
        if region == "slab":
            red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            settings.slab = slab_at_slice(volumeNode, red, self.ui.slabSpinBox.value)
        elif region == "roi":
            # The worker computed inside the ROI only; the segment changes inside it only.
            settings.roi_box_ijk = roi_box_ijk(self.ui.roiSelector.currentNode(), volumeNode)
        return settings

    def onApply(self, checked=False):
        with slicer.util.tryWithErrorDisplay(_("MoME could not compute the structure."), waitCursor=True):
            logic = self.moduleLogic()
            if not logic.ensureDependencies():
                return
            volumeNode = self.sourceVolume()
            if volumeNode is None:
                raise MoMEError(_("Select a source volume in the Segment Editor first."))
            roiNode = self.ui.roiSelector.currentNode() if self.ui.regionSelector.currentData == "roi" else None
            if self.ui.regionSelector.currentData == "roi" and roiNode is None:
                raise MoMEError(_("Select an ROI, or limit to the whole volume."))
            prompt = self.ui.promptEdit.text.strip()
            reusable = (self.result is not None and self.result.prompt == prompt and roiNode is None
                        and volume_key(volumeNode) == self.result.volume_key)
            if reusable:
                self.applyResult()
                return
            p = logic.getParameterNode()
            self.job = logic.segmentStructure(
                volumeNode, prompt, onProgress=self.onJobProgress, onFinished=self.onJobFinished, model=p.model,
                device=p.device.value, roiNode=roiNode, fast=p.fastMode, anatomyGuard=p.anatomyGuard)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Computing {prompt}...").format(prompt=prompt)
            self.ui.applyButton.enabled = False
            self.ui.cancelButton.enabled = True
            self._pollTimer.start()

    def onPoll(self):
        self.moduleLogic().processEvents()

    def onCancel(self, checked=False):
        self.moduleLogic().cancel()

    def onJobProgress(self, job):
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.statusLabel.text = f"{job.stage}: {job.message}" if job.message else job.stage

    def onJobFinished(self, job):
        self._pollTimer.stop()
        self.ui.applyButton.enabled = True
        self.ui.cancelButton.enabled = False
        if job.state == JobState.CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled. The segment was not changed.")
            return
        if job.state == JobState.FAILED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Failed: {message}").format(message=job.error)
            slicer.util.errorDisplay(_("MoME failed: {message}").format(message=job.error))
            return
        self.ui.progressBar.value = 100
        self.result = job.result_ref
        self.showConfidence()
        if not self.result.found:
            self.ui.statusLabel.text = _("{name} not found: {note}. The segment was not changed.").format(
                name=self.result.name, note=self.result.summary.get("note") or "")
            return
        with slicer.util.tryWithErrorDisplay(_("MoME could not write the structure."), waitCursor=True):
            self.applyResult()

    def applyResult(self):
        volumeNode = self.sourceVolume()
        node = self.scriptedEffect.parameterSetNode()
        self.live = LiveThreshold(EffectEditorParts(self.scriptedEffect), node.GetSelectedSegmentID(), self.result,
                                  volumeNode, self.settings(volumeNode))
        self.live.apply()
        self.ui.statusLabel.text = _("{name} written into the segment (Undo reverts it).").format(name=self.result.name)
        if self.ui.showProbabilityCheckBox.checked:
            self.overlayNode = show_probability(self.result, volumeNode, self.overlayNode)

    # ------------------------------------------------------------------ confidence

    def showConfidence(self):
        summary = self.result.summary
        self.ui.confidenceLabel.text = _("{name}: mean probability {p:.2f}, uncertain volume {ml:.1f} mL "
                                         "(0.3 < p < 0.7)").format(
            name=self.result.name, p=float(summary.get("mean_probability") or 0.0),
            ml=float(summary.get("uncertain_ml") or 0.0))

    def onShowProbability(self, checked):
        if checked and self.result is not None:
            self.overlayNode = show_probability(self.result, self.sourceVolume(), self.overlayNode)
        elif not checked:
            slicer.util.setSliceViewerLayers(foreground=None)

    def onThresholdChanged(self, value):
        if self.live is not None:
            self._thresholdTimer.start()

    def onThresholdSettled(self):
        with slicer.util.tryWithErrorDisplay(_("MoME could not update the segment."), waitCursor=True):
            if self.live is not None:
                self.live.set_threshold(self.ui.thresholdSlider.value)

    # ------------------------------------------------------------------ review

    def onFindDisagreements(self, checked=False):
        with slicer.util.tryWithErrorDisplay(_("MoME could not review the segment."), waitCursor=True):
            volumeNode = self.sourceVolume()
            if self.result is None or volumeNode is None or volume_key(volumeNode) != self.result.volume_key:
                raise MoMEError(_("Apply MoME on this volume first: the review compares the segment with its result."))
            node = self.scriptedEffect.parameterSetNode()
            self.review = SegmentReview(EffectEditorParts(self.scriptedEffect), node.GetSelectedSegmentID(),
                                        self.result, volumeNode, self.ui.thresholdSlider.value,
                                        tolerance_mm=self.ui.toleranceSpinBox.value)
            self.fillReviewTable()
            self.ui.statusLabel.text = _("{count} regions of disagreement.").format(count=len(self.review.items))

    def fillReviewTable(self):
        rows = self.review.rows() if self.review else []
        self.ui.reviewTable.setRowCount(len(rows))
        for rowIndex, row in enumerate(rows):
            for column, text in enumerate(row):
                self.ui.reviewTable.setItem(rowIndex, column, qt.QTableWidgetItem(text))
        self.ui.reviewTable.resizeColumnsToContents()

    def selectedReviewItem(self):
        rows = {index.row() for index in self.ui.reviewTable.selectedIndexes()}
        if not self.review or len(rows) != 1:
            return None
        return self.review.items[rows.pop()]

    def onReviewSelection(self):
        item = self.selectedReviewItem()
        if item is not None:
            self.review.centre_views(item)

    def onAccept(self, checked=False):
        with slicer.util.tryWithErrorDisplay(_("MoME could not change the segment."), waitCursor=True):
            item = self.selectedReviewItem()
            if item is not None:
                self.review.accept(item)
                self.fillReviewTable()

    def onReject(self, checked=False):
        item = self.selectedReviewItem()
        if item is not None:
            self.review.reject(item)
            self.fillReviewTable()

    # ------------------------------------------------------------------ export

    def onExport(self, checked=False):
        with slicer.util.tryWithErrorDisplay(_("Exporting for training failed."), waitCursor=True):
            volumeNode = self.sourceVolume()
            segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
            folder = self.ui.datasetPathEdit.currentPath
            if not folder:
                raise MoMEError(_("Choose a dataset folder first."))
            labels = training_labels(segmentationNode)
            path = export_for_training(volumeNode, segmentationNode, folder, labels,
                                       model=self.moduleLogic().getParameterNode().model)
            self.ui.datasetPathEdit.addCurrentPathToHistory()
            self.ui.statusLabel.text = _("Exported {count} structures to {path}.").format(count=len(labels), path=path)
            logging.info(f"MoME: exported {sorted(labels.values())} to {path}")
