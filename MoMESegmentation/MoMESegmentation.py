import enum
import importlib.util
import logging
import os
import shutil
import sys
import time

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import parameterNodeWrapper

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode


#
# Where the module's files are
#


def findModuleLayout(moduleDir):
    """Locate ``Resources/`` and the folder that holds ``MoMESegmentationLib`` for this module.

    Two layouts are supported and looked for in this order:

    - built extension: ``Resources/`` and ``MoMESegmentationLib/`` beside ``MoMESegmentation.py``
      (CMake copies them there);
    - source tree (Application Settings > Modules > Additional module paths pointing at the
      ``MoMESegmentation/`` folder of a checkout): both one folder up.

    Returns a dict with ``resources`` and ``libraryParent`` (absolute paths, ``None`` when absent).
    """
    import os

    moduleDir = os.path.abspath(moduleDir)
    candidates = [moduleDir, os.path.dirname(moduleDir)]
    resources = next((os.path.join(c, "Resources") for c in candidates
                      if os.path.isfile(os.path.join(c, "Resources", "UI", "MoMESegmentation.ui"))), None)
    libraryParent = next((c for c in candidates
                          if os.path.isfile(os.path.join(c, "MoMESegmentationLib", "__init__.py"))), None)
    return {"resources": resources, "libraryParent": libraryParent}


MODULE_LAYOUT = findModuleLayout(os.path.dirname(os.path.abspath(__file__)))
# MoMESlicer/ (the Qt-free scene layer) sits beside this file; Slicer puts this folder on sys.path.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if MODULE_LAYOUT["libraryParent"] and MODULE_LAYOUT["libraryParent"] not in sys.path:
    sys.path.insert(0, MODULE_LAYOUT["libraryParent"])

import MoMESegmentationLib  # noqa: E402

# Slicer 5.8 and older run Python 3.9, on which the network code cannot run: refuse to load with
# one sentence rather than fail on every segmentation (the extension is built for 5.10+ only).
if MoMESegmentationLib.unsupported_python_reason():
    raise ImportError(MoMESegmentationLib.unsupported_python_reason())

from MoMESegmentationLib.errors import MoMEError  # noqa: E402
from MoMESegmentationLib.model_install import (  # noqa: E402
    InstallJob,
    install_command,
    model_choices,
    plan_install,
    suggest_install_name,
)
from MoMESegmentationLib.slicer_workflow import (  # noqa: E402
    MODULE_REQUIREMENTS,
    JobState,
    ResultRow,
    SegmentationOptions,
    SegmentationWorkflow,
    completion_terms,
    last_prompt_fragment,
    load_model_cards,
    missing_requirements,
    model_card_html,
    plan_segment_names,
    replace_last_prompt,
    result_rows,
    install_torch,
    update_recent_prompts,
)
from MoMESlicer.correction import start_structure_job  # noqa: E402
from MoMESlicer.scene import SlicerScene  # noqa: E402
from MoMESegmentationLib.worker_client import WorkerClient  # noqa: E402
from MoMESegmentationLib.remote_client import api_key_from_env, client_for, connection_report  # noqa: E402


def moduleResourcePath(*parts):
    """Path of a file in the module's ``Resources/`` folder (see :func:`findModuleLayout`)."""
    if not MODULE_LAYOUT["resources"]:
        raise RuntimeError(_("MoMESegmentation resources were not found beside {path} or one folder up.").format(
            path=os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(MODULE_LAYOUT["resources"], *parts)


#
# MoMESegmentation
#



def _slicerPackaging():
    """``slicer.packaging`` where this Slicer has it (5.12 and later), else None."""
    try:
        from slicer import packaging
    except ImportError:
        return None
    return packaging

def _lightTheTorchInstaller():
    """``install(requirement)`` through the PyTorch extension's light-the-torch, or None without it.

    light-the-torch picks the PyTorch build that matches the NVIDIA driver. It runs as a child
    process, as the extension itself runs it; the extension's ``installTorch`` is not used because
    it imports torch into Slicer's process afterwards.
    """
    try:
        import PyTorchUtils
    except ImportError:
        return None

    def install(requirement):
        torchLogic = PyTorchUtils.PyTorchUtilsLogic
        version = requirement[len("torch"):] or None
        args = [arg for arg in torchLogic._getPipInstallArguments(torchVersionRequirement=version)
                if not arg.startswith("torchvision")]
        if importlib.util.find_spec("light_the_torch") is None:
            torchLogic._installLightTheTorch()
        slicer.util._executePythonModule("light_the_torch", args)

    return install


class MoMESegmentation(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MoME Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MoMESegmentation contributors"]
        self.parent.helpText = _("""
Text-prompted CT segmentation with a Mixture of Visual-Language Medical Experts (MoME).
Type the structures to segment (for example <i>liver, spleen, left kidney</i>), choose a model and press Segment.
Inference runs in a separate process; the scene changes only when a result is complete.
See the <a href="https://github.com/MoMESegmentation/MoMESegmentation/blob/main/docs/SLICER.md">module documentation</a>.
Research use, not for diagnosis.
""")
        self.parent.acknowledgementText = _("""
MoME was described by Rezvani et al. (arXiv 2510.26996). The module builds on MONAI, PyTorch and 3D Slicer.
The bundled example CT comes from TotalSegmentator's reference files (Apache-2.0).
""")
        if MODULE_LAYOUT["resources"]:
            # ScriptedLoadableModule looks only beside this file; a source checkout keeps it one folder up.
            self.parent.icon = qt.QIcon(moduleResourcePath("Icons", "MoMESegmentation.png"))
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", registerEditorEffect)


#
# Register the "MoME" Segment Editor effect
#


def registerEditorEffect():
    """Add the MoME effect to the Segment Editor, as Slicer's own scripted effects are added."""
    import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

    effect = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
    effectPath = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SegmentEditorMoMELib", "SegmentEditorEffect.py")
    effect.setPythonSource(effectPath.replace("\\", "/"))
    effect.self().register()


#
# Register sample data sets in Sample Data module
#


def registerSampleData():
    """Add the bundled example CT to the Sample Data module."""
    import pathlib

    import SampleData

    ctPath = moduleResourcePath("SampleData", "example_ct.nii.gz")
    if not os.path.isfile(ctPath):
        logging.warning(f"MoMESegmentation sample CT not found: {ctPath}")
        return
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer 5.12 and later
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("MoMESegmentation", title=_("MoME Segmentation"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MoMESegmentation",
        sampleName="MoMEExampleCT",
        thumbnailFileName=moduleResourcePath("Icons", "MoMESegmentation.png"),
        uris=pathlib.Path(ctPath).as_uri(),
        fileNames="MoMEExampleCT.nii.gz",
        nodeNames="MoMEExampleCT",
        loadFileTypes="VolumeFile",
    )


#
# MoMESegmentationParameterNode
#


class Device(enum.Enum):
    """Where inference runs; the value is what the worker receives."""

    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self):
        return {Device.AUTO: _("Auto (GPU if available)"), Device.GPU: _("GPU (CUDA)"), Device.CPU: _("CPU")}[self]


class RunOn(enum.Enum):
    """Where the segmentation runs: a worker process here, or a ``mome serve`` server."""

    LOCAL = "local"
    SERVER = "server"

    def label(self):
        return {RunOn.LOCAL: _("This computer"), RunOn.SERVER: _("A server (mome serve)")}[self]


class SegmentMode(enum.Enum):
    """What happens to existing segments that have the name of a result segment."""

    ADD = "add"
    REPLACE = "replace"

    def label(self):
        return {SegmentMode.ADD: _("Add new segments (keep existing)"),
                SegmentMode.REPLACE: _("Replace segments with the same name")}[self]


@parameterNodeWrapper
class MoMESegmentationParameterNode:
    """
    The parameters needed by module.

    inputVolume - The CT volume to segment.
    prompts - Structures to segment, separated by commas.
    model - Registry name of the model (Resources/models.json).
    device - Where inference runs.
    roi - Optional region of interest; only voxels inside are segmented.
    outputSegmentation - Segmentation that receives the segments (None: create a new one).
    segmentMode - Add to or replace existing segments with the same name.
    probabilities - Also compute per-structure probability maps.
    largestComponent - Keep only the largest connected component of each structure.
    showExperts - Also compute the router's maps and show, for the structure selected in the results
        table, which expert (decoder scale) each voxel trusted.
    fastMode - 1.2x coarser grid: about 3x quicker on a CPU.
    anatomyGuard - Refuse non-CT input and report masks the field of view makes implausible as not found.
    runOn - This computer, or a segmentation server.
    serverUrl - The server's address (its API key is kept out of the scene).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    prompts: str = "liver, spleen, left kidney"
    model: str = "demo"
    device: Device = Device.AUTO
    roi: vtkMRMLMarkupsROINode
    outputSegmentation: vtkMRMLSegmentationNode
    segmentMode: SegmentMode = SegmentMode.ADD
    probabilities: bool = False
    largestComponent: bool = False
    showExperts: bool = False
    fastMode: bool = False
    anatomyGuard: bool = True
    runOn: RunOn = RunOn.LOCAL
    serverUrl: str = ""


#
# MoMESegmentationWidget
#


class MoMESegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    RECENT_PROMPTS_KEY = "MoMESegmentation/RecentPrompts"
    SERVER_URL_KEY = "MoMESegmentation/ServerUrl"

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._completer = None
        self._pollTimer = None

    def resourcePath(self, filename):
        """Resources are beside the module in a built extension and one folder up in the source tree."""
        return moduleResourcePath(filename)

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MoMESegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MoMESegmentationLogic()
        self.logic.logCallback = self.appendLog
        self.logic.progressCallback = self.onJobProgress
        self.logic.finishedCallback = self.onJobFinished
        self.logic.installProgressCallback = self.onInstallProgress
        self.logic.installFinishedCallback = self.onInstallFinished

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self.logic.processEvents)

        self.refreshModelSelector()
        self.ui.resultsTable.setColumnCount(len(ResultRow.HEADERS))
        self.ui.resultsTable.setHorizontalHeaderLabels([_(header) for header in ResultRow.HEADERS])

        self._completer = qt.QCompleter(self.ui.promptEdit)
        self._completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self._completer.setFilterMode(qt.Qt.MatchContains)
        self._completer.setWidget(self.ui.promptEdit)
        self._completer.connect("activated(QString)", self.onCompletionActivated)
        self.ui.promptEdit.connect("textEdited(QString)", self.onPromptEdited)
        self.updateCompleter()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.addCheckpointButton.connect("clicked(bool)", self.onAddCheckpoint)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.updateDeviceNote)
        self.ui.runOnSelector.connect("currentIndexChanged(int)", self.updateRunOn)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.serverUrlEdit.connect("editingFinished()", self.updateRunOn)
        self.ui.serverKeyEdit.connect("editingFinished()", self.updateRunOn)
        self.ui.serverKeyEdit.text = api_key_from_env() or ""
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.show3DButton.connect("toggled(bool)", self.onShow3DToggled)
        self.ui.resultsTable.connect("itemSelectionChanged()", self.onResultSelected)
        self.ui.resultsTable.setColumnHidden(ResultRow.EXPLAIN_COLUMN, True)

        self.initializeParameterNode()
        self.updateDeviceNote()
        self.updateRunOn()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()
        if self._pollTimer:
            self._pollTimer.stop()
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        if self.logic and self.logic.busy:
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        self.logic.scene.experts.forget()
        self.ui.resultsTable.setRowCount(0)
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.serverUrl:
            self._parameterNode.serverUrl = str(qt.QSettings().value(self.SERVER_URL_KEY) or "")
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        """Set and observe parameter node."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with the "SlicerParameterName" dynamic property in the .ui file are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            index = self.ui.modelSelector.findData(self._parameterNode.model)
            if index >= 0:
                self.ui.modelSelector.setCurrentIndex(index)
            self.onModelSelected()
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        busy = bool(self.logic and self.logic.busy)
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._parameterNode.prompts.strip())
        choice = self.logic.modelChoice(self.ui.modelSelector.currentData) if self.logic else None
        installed = bool(choice and choice.installed) or self.runsOnServer()  # a server has its own model
        self.ui.segmentButton.enabled = ready and installed and not busy
        self.ui.cancelButton.enabled = busy
        if not installed:
            self.ui.segmentButton.toolTip = _("Install the selected model first (Download and install).")
        else:
            self.ui.segmentButton.toolTip = _("Segment the typed structures") if ready else _(
                "Select an input volume and type at least one structure")
        self.ui.downloadModelButton.enabled = bool(choice and choice.downloadable and not choice.installed) and not busy
        self.ui.addCheckpointButton.enabled = not busy

    def modelChoiceLabel(self, choice) -> str:
        if choice.installed:
            return choice.title
        if choice.downloadable:
            return _("{title} (download)").format(title=choice.title)
        return _("{title} (not installed)").format(title=choice.title)

    def refreshModelSelector(self, select=None) -> None:
        """List the registry's models (installed, downloadable) and the checkpoints added under own names."""
        current = select or self.ui.modelSelector.currentData or (self._parameterNode.model if self._parameterNode else None)
        wasBlocked = self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for choice in self.logic.modelChoices(refresh=True):
            self.ui.modelSelector.addItem(self.modelChoiceLabel(choice), choice.name)
        index = self.ui.modelSelector.findData(current) if current else -1
        self.ui.modelSelector.setCurrentIndex(max(index, 0))
        self.ui.modelSelector.blockSignals(wasBlocked)
        self.onModelSelected()

    def onModelSelected(self, index=None) -> None:
        name = self.ui.modelSelector.currentData
        if not name:
            return
        if self._parameterNode and self._parameterNode.model != name:
            self._parameterNode.model = name
        self.ui.modelCardBrowser.setHtml(self.logic.modelCardHtml(name))
        self.updateCompleter()
        self._checkCanApply()

    def updateDeviceNote(self, index=None) -> None:
        self.ui.deviceNoteLabel.text = self.logic.deviceNote(self.ui.deviceSelector.currentIndex)

    def runsOnServer(self) -> bool:
        return bool(self._parameterNode and self._parameterNode.runOn == RunOn.SERVER)

    def updateRunOn(self, index=None) -> None:
        """Show the server's address and key only when running on a server; the device is the server's then."""
        remote = self.ui.runOnSelector.currentIndex == list(RunOn).index(RunOn.SERVER)
        for widget in (self.ui.serverUrlLabel, self.ui.serverUrlEdit, self.ui.serverKeyLabel, self.ui.serverKeyEdit,
                       self.ui.testConnectionButton, self.ui.connectionStatusLabel):
            widget.visible = remote
        self.ui.deviceSelector.enabled = not remote
        if self.logic and not self.logic.busy:  # the Segment Editor effect runs where the panel does
            self.logic.useServer(self.ui.serverUrlEdit.text if remote else None, self.ui.serverKeyEdit.text)
        self._checkCanApply()

    def onTestConnection(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot test the connection."), waitCursor=True):
            ok, message = self.logic.testConnection(self.ui.serverUrlEdit.text, self.ui.serverKeyEdit.text)
            if ok:
                qt.QSettings().setValue(self.SERVER_URL_KEY, self.ui.serverUrlEdit.text.strip())
            self.ui.connectionStatusLabel.text = message
            self.appendLog(message)

    def recentPrompts(self):
        value = qt.QSettings().value(self.RECENT_PROMPTS_KEY)
        if not value:
            return []
        return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]

    def updateCompleter(self) -> None:
        if not self._completer:
            return
        terms = completion_terms(self.logic.modelStructures(self.ui.modelSelector.currentData),
                                 self.logic.vocabularyPath(), self.recentPrompts())
        self._completer.setModel(qt.QStringListModel(terms, self._completer))

    def onPromptEdited(self, text) -> None:
        fragment = last_prompt_fragment(text)
        if not fragment:
            self._completer.popup().hide()
            return
        self._completer.setCompletionPrefix(fragment)
        self._completer.complete()

    def onCompletionActivated(self, term) -> None:
        self.ui.promptEdit.text = replace_last_prompt(self.ui.promptEdit.text, term)

    def appendLog(self, text) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onSegmentButton(self) -> None:
        """Start a segmentation in the background."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            remote = self.runsOnServer()
            if not remote and not self.logic.ensureDependencies():  # a server needs nothing installed here
                return
            p = self._parameterNode
            qt.QSettings().setValue(self.RECENT_PROMPTS_KEY, update_recent_prompts(self.recentPrompts(), p.prompts))
            self.updateCompleter()
            self.ui.resultsTable.setRowCount(0)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self.logic.segment(
                p.inputVolume, p.prompts, segmentationNode=p.outputSegmentation, wait=False, model=p.model,
                device=p.device.value, roiNode=p.roi, replace=(p.segmentMode == SegmentMode.REPLACE),
                probabilities=p.probabilities, largestComponent=p.largestComponent, fast=p.fastMode,
                anatomyGuard=p.anatomyGuard, explain=p.showExperts, server=p.serverUrl if remote else None,
                apiKey=self.ui.serverKeyEdit.text if remote else None)
            self._pollTimer.start()
        self._checkCanApply()

    def onCancelButton(self) -> None:
        self.logic.cancel()

    def onDownloadModel(self) -> None:
        self.startModelInstall(self.ui.modelSelector.currentData)

    def onAddCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Add a checkpoint file"), "",
            _("Model files (*.pth *.pt *.safetensors);;All files (*)"))
        if path:
            self.startModelInstall(self.logic.installNameForFile(path, self.ui.modelSelector.currentData), path)

    def startModelInstall(self, name, path=None) -> None:
        """Show the license (when the model has one), then install in a background process."""
        with slicer.util.tryWithErrorDisplay(_("Cannot install the model."), waitCursor=True):
            plan = self.logic.planModelInstall(name, path)
            if not self.logic.ensureDependencies():
                return
            if plan.question and not slicer.util.confirmOkCancelDisplay(
                    plan.question + "\n\n" + _("Click OK to accept this license and install the model."),
                    _("Model license")):
                return
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Installing {name}...").format(name=name)
            self.logic.installModel(name, path)
            self._pollTimer.start()
        self._checkCanApply()

    def onInstallProgress(self, job) -> None:
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.statusLabel.text = job.message or job.stage

    def onInstallFinished(self, job) -> None:
        self._pollTimer.stop()
        if job.state == "done":
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = _("Installed {name}.").format(name=job.name)
            self.refreshModelSelector(select=job.name)
        elif job.state == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Installation cancelled. The model store was not changed.")
        else:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Failed: {message}").format(message=job.error)
            slicer.util.errorDisplay(_("Installing the model failed: {message}").format(message=job.error))
        self._checkCanApply()

    def onJobProgress(self, job) -> None:
        self.ui.progressBar.value = int(round(100 * job.fraction))
        self.ui.statusLabel.text = f"{job.stage}: {job.message}" if job.message else job.stage

    def onJobFinished(self, job) -> None:
        self._pollTimer.stop()
        self._checkCanApply()
        if job.state == JobState.DONE:
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s.").format(seconds=job.elapsed_s)
            if self._parameterNode and not self._parameterNode.outputSegmentation:
                self._parameterNode.outputSegmentation = job.result_ref
            self._shownResult = (job.result_ref, job.volume_ref, self.logic.scene.experts.latest(job.result_ref))
            self.showResults(job.summary)
            if self.ui.show3DButton.checked:
                self.logic.showSegmentation3D(job.result_ref, True)
        elif job.state == JobState.CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled. The scene was not changed.")
        else:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Failed: {message}").format(message=job.error)
            slicer.util.errorDisplay(_("Segmentation failed: {message}").format(message=job.error))

    def showResults(self, summary) -> None:
        rows = result_rows(summary)
        self.ui.resultsTable.setRowCount(len(rows))
        for rowIndex, row in enumerate(rows):
            for column, text in enumerate(row.cells()):
                self.ui.resultsTable.setItem(rowIndex, column, qt.QTableWidgetItem(text))
        explained = any(row.dominant_scale for row in rows)
        self.ui.resultsTable.setColumnHidden(ResultRow.EXPLAIN_COLUMN, not explained)
        self.ui.resultsTable.resizeColumnsToContents()
        if explained:  # the first found structure's expert maps, until another row is selected
            first = next(index for index, row in enumerate(rows) if row.dominant_scale)
            self.ui.resultsTable.selectRow(first)

    def onResultSelected(self) -> None:
        """With *Show experts*, load the expert maps of the structure selected in the results table."""
        shown = getattr(self, "_shownResult", None)
        selected = self.ui.resultsTable.selectedIndexes()
        if not shown or not selected or not shown[2]:
            return
        segmentationNode, volumeNode, names = shown
        name = names.get(selected[0].row() + 1)  # rows follow the labels, 1 for the first prompt
        if name is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to show the expert maps."), waitCursor=True):
            self.logic.showExperts(segmentationNode, name, volumeNode)

    def onShow3DToggled(self, checked) -> None:
        segmentationNode = self._parameterNode.outputSegmentation if self._parameterNode else None
        if segmentationNode:
            self.logic.showSegmentation3D(segmentationNode, checked)


#
# MoMESegmentationLogic
#


class MoMESegmentationLogic(ScriptedLoadableModuleLogic):
    """Runs MoME segmentations; usable from the Python console without the GUI::

        logic = slicer.util.getModuleLogic("MoMESegmentation")
        job = logic.segment(volumeNode, "liver, spleen", segmentationNode=None, wait=True)
        job.result_ref  # the segmentation node

    Inference runs in a worker process (``PythonSlicer -m MoMESegmentationLib.cli worker``) that
    stays alive between runs; the scene is changed only when a job succeeds. Everything that touches
    the scene (input checks, export, import, probability maps) is ``self.scene``, a
    :class:`SlicerScene`: it needs no Qt and is tested on Slicer's own MRML classes.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self.progressCallback = None
        self.finishedCallback = None
        self.installProgressCallback = None
        self.installFinishedCallback = None
        self._workflow = None
        self._install = None
        self._cards = None
        self._choices = None
        self._jobCallbacks = {}  # job id -> (onProgress, onFinished) of jobs not started by the panel
        self._server = None  # (address, API key) of the segmentation server, or None: a worker here
        self._workflowServer = None  # what the current workflow's client talks to
        self.scene = SlicerScene()

    def getParameterNode(self):
        return MoMESegmentationParameterNode(super().getParameterNode())

    # Models, vocabulary, device

    def modelCards(self):
        if self._cards is None:
            self._cards = load_model_cards(moduleResourcePath("models.json"))
        return self._cards

    def modelChoices(self, refresh=False):
        """Registry models (installed or downloadable) and checkpoints installed under own names."""
        if self._choices is None or refresh:
            from MoMESegmentationLib.registry import default_store

            registry = {card.name: card for card in self.modelCards()}
            self._choices = model_choices(default_store(), registry=registry, resources=MODULE_LAYOUT["resources"])
        return self._choices

    def modelChoice(self, name):
        return next((choice for choice in self.modelChoices() if choice.name == name), None)

    def modelCard(self, name):
        choice = self.modelChoice(name)
        if choice is not None:
            return choice.entry
        return next((card for card in self.modelCards() if card.name == name), None)

    def modelCardHtml(self, name) -> str:
        card = self.modelCard(name)
        if card is None:
            return _("No information about model {name}.").format(name=name)
        from MoMESegmentationLib.registry import default_store

        path = card.checkpoint_path(default_store(), resources=MODULE_LAYOUT["resources"])
        return model_card_html(card, installed=None if path is None else os.path.isfile(path))

    def modelStructures(self, name):
        """Structure ids of a model: from the loaded worker when it holds this model, else its card."""
        workflow = self._workflow
        if workflow and workflow.structures and workflow.client.loaded and workflow.client.loaded.get("model") == name:
            return workflow.structures
        card = self.modelCard(name)
        return list(card.structures) if card else []

    def vocabularyPath(self):
        path = moduleResourcePath("vocabulary.json")
        return path if os.path.isfile(path) else None

    def deviceNote(self, deviceIndex) -> str:
        device = list(Device)[deviceIndex] if 0 <= deviceIndex < len(Device) else Device.AUTO
        if device == Device.CPU:
            threads = max(1, (os.cpu_count() or 1) - 2)
            return _("Runs on {threads} CPU threads so that Slicer stays responsive; a CT takes minutes.").format(
                threads=threads)
        return _("GPU memory: about 4 GB for the demo model, 8-12 GB for the Universal Model. "
                 "Out-of-memory errors stop only the worker, never Slicer.")

    # Dependencies

    def missingDependencies(self):
        """Requirements that are not installed (checked without importing them)."""
        slicerPackaging = _slicerPackaging()
        if slicerPackaging is not None:
            return [r for r in MODULE_REQUIREMENTS if not slicerPackaging.pip_check(r)]
        return missing_requirements(MODULE_REQUIREMENTS)

    def ensureDependencies(self, askConfirmation=True) -> bool:
        """Install missing Python packages after asking; returns False if the user declined.

        Nothing is needed when jobs run on a server (:meth:`useServer`).
        """
        if self._server is not None:
            return True
        missing = self.missingDependencies()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("MoME Segmentation needs additional Python packages. Installation needs a network connection "
              "and may take several minutes. Click OK to install them."),
            _("Install Python packages"),
            detailedText=_("Packages to install: {packages}").format(packages=", ".join(missing)),
        ):
            return False
        torchRequirement = next((r for r in missing if r.startswith("torch")), None)
        if torchRequirement:
            self.log(_("Installing PyTorch (this may take several minutes)..."))
            self.installTorch(torchRequirement)
        others = [r for r in missing if r != torchRequirement]
        if others:
            self.log(_("Installing {packages}...").format(packages=", ".join(others)))
            slicerPackaging = _slicerPackaging()
            if slicerPackaging is not None:
                slicerPackaging.pip_ensure(others, prompt_install=False, requester="MoMESegmentation",
                                           skip_in_testing=False)
            else:
                slicer.util.pip_install(others)
        still = self.missingDependencies()
        if still:
            raise MoMEError(_("Python packages still missing after installation: {packages}").format(
                packages=", ".join(still)))
        return True

    def installTorch(self, requirement) -> None:
        """PyTorch through the PyTorch extension's light-the-torch (right CUDA build) when present, else pip.

        Both run pip in a child process; torch is never imported into Slicer's own process.
        """
        how = install_torch(requirement, _lightTheTorchInstaller(), slicer.util.pip_install, self.log)
        self.log(_("PyTorch installed with {tool}.").format(tool=how))

    # Installing models

    def planModelInstall(self, name, path=None):
        """What installing ``name`` (from ``path``) will do and the license to accept; raises MoMEError."""
        from MoMESegmentationLib.registry import default_store

        return plan_install(name, path, store=default_store(), registry={c.name: c for c in self.modelCards()})

    def installNameForFile(self, path, selected=None) -> str:
        return suggest_install_name(path, selected, registry={card.name: card for card in self.modelCards()})

    def installModel(self, name, path=None):
        """Install ``name`` in a background ``PythonSlicer`` process (the caller has shown the license:
        the process runs with ``--yes``). :meth:`processEvents` reports progress and the end."""
        if self.busy:
            raise MoMEError(_("Wait for the running job to end, or cancel it."))
        command = install_command(self.pythonSlicer(), name, file=path)
        self._install = InstallJob(command, env=self.workerEnvironment(), cwd=MODULE_LAYOUT["libraryParent"],
                                   name=name)
        self._install.start()
        self.log(_("Installing model {name}: {command}").format(name=name, command=" ".join(command)))
        return self._install

    def _processInstall(self) -> None:
        job = self._install
        for event in job.poll():
            if event["event"] == "log" and event["text"].strip():
                self.log(event["text"])
            elif event["event"] == "progress" and self.installProgressCallback:
                self.installProgressCallback(job)
        if job.running:
            return
        self._install = None
        self._choices = None
        if job.state == "done":
            self.log(_("Installed model {name}: {path}").format(name=job.name, path=job.path))
            client = self._workflow.client if self._workflow else None
            if client and client.loaded and client.loaded.get("model") == job.name:
                client.needs_restart = True  # the worker holds the previous weights
        elif job.state == "cancelled":
            self.log(_("Installing model {name} was cancelled; the model store was not changed.").format(name=job.name))
        else:
            self.log(_("Installing model {name} failed: {message}").format(name=job.name, message=job.error))
        if self.installFinishedCallback:
            self.installFinishedCallback(job)

    # Running

    @property
    def busy(self) -> bool:
        return bool(self._workflow and self._workflow.busy) or bool(self._install and self._install.running)

    def pythonSlicer(self):
        pythonSlicer = shutil.which("PythonSlicer")
        if not pythonSlicer:
            raise MoMEError(_("PythonSlicer was not found: cannot start a background process."))
        return pythonSlicer

    def workerCommand(self):
        return [self.pythonSlicer(), "-m", "MoMESegmentationLib.cli", "worker"]

    def workerEnvironment(self):
        env = slicer.util.startupEnvironment()
        libraryParent = MODULE_LAYOUT["libraryParent"]
        if libraryParent:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (libraryParent, env.get("PYTHONPATH", "")) if p)
        return env

    def useServer(self, server=None, apiKey=None) -> None:
        """Run the next jobs on the segmentation server at ``server`` (``None``: on this computer)."""
        server = (server or "").strip() or None
        if server is None:
            self._server = None
            return
        self._server = (server, apiKey or None)

    def testConnection(self, server, apiKey=None):
        """``(ok, message)``: what the server at ``server`` runs, or why it cannot be used (one line)."""
        return connection_report(server, apiKey or None)

    def workflow(self) -> SegmentationWorkflow:
        """The workflow, its client a worker process here or the chosen server (see :meth:`useServer`)."""
        if self._workflow is not None and self._workflowServer != self._server and not self._workflow.busy:
            self._workflow.shutdown()
            self._workflow = None
        if self._workflow is None:
            server, apiKey = self._server or (None, None)
            try:
                client = client_for(server, apiKey, lambda: WorkerClient(
                    self.workerCommand(), env=self.workerEnvironment(), log_callback=self.log,
                    cwd=MODULE_LAYOUT["libraryParent"]), log_callback=self.log)
            except ValueError as error:  # a malformed server address
                raise MoMEError(str(error)) from None
            self._workflow = SegmentationWorkflow(client, self.scene, on_progress=self._onProgress,
                                                  on_finished=self._onFinished)
            self._workflowServer = self._server
        return self._workflow

    def segment(self, volumeNode, prompts, segmentationNode=None, wait=True, model="demo", device="auto",
                roiNode=None, replace=False, probabilities=False, largestComponent=False, fast=False,
                anatomyGuard=True, threads=None, timeout=None, server=None, apiKey=None, explain=False):
        """Segment the structures named in ``prompts`` (comma-separated) in ``volumeNode``.

        :param segmentationNode: segmentation that receives the segments; ``None`` creates one.
        :param server: address of a ``mome serve`` server to run on (its model is used; ``apiKey`` is
            its key); ``None`` runs a worker process on this computer.
        :param anatomyGuard: refuse non-CT input; report masks the field of view makes implausible
            (a liver in a head CT) as not found, with the reason in the results table.
        :param explain: also compute the router's maps; :meth:`showExperts` then shows a structure's.
        :param wait: block until the job ends (then raise on failure); otherwise return at once and
            let :meth:`processEvents` (a QTimer in the module panel) drive it.
        :return: the job (``job.state``, ``job.result_ref`` = segmentation node, ``job.summary``).
        """
        if not volumeNode:
            raise MoMEError(_("Select an input volume."))
        self.scene.check_input_volume(volumeNode)
        roi = self.roiBox(roiNode, volumeNode) if roiNode else None
        options = SegmentationOptions(model=model, device=device, threads=threads, roi=roi, replace=replace,
                                      probabilities=probabilities, largest_component=largestComponent, fast=fast,
                                      anatomy_guard=anatomyGuard, explain=explain)
        self.useServer(server, apiKey)
        workflow = self.workflow()
        if server:
            self.log(_("Segmenting '{prompts}' in {volume} on the server {server}").format(
                prompts=prompts, volume=volumeNode.GetName(), server=server))
        else:
            self.log(_("Segmenting '{prompts}' in {volume} with model {model} on {device}").format(
                prompts=prompts, volume=volumeNode.GetName(), model=model, device=device))
        job = workflow.start(volumeNode, prompts, segmentationNode, options)
        if wait:
            workflow.wait(timeout=timeout, idle=slicer.app.processEvents)
            if job.state == JobState.RUNNING:
                workflow.cancel()
                raise MoMEError(_("The segmentation did not finish within {seconds} s.").format(seconds=timeout))
            if job.state == JobState.FAILED:
                raise MoMEError(job.error)
        return job

    def segmentStructure(self, volumeNode, prompt, onProgress=None, onFinished=None, model="demo", device="auto",
                         roiNode=None, fast=False, anatomyGuard=True, threads=None):
        """Compute one structure's probability in ``volumeNode`` for the Segment Editor effect.

        The scene does not change; when the job is done ``job.result_ref`` is a
        :class:`~MoMESlicer.correction.StructureProbability`. It runs in the same worker as the
        panel's jobs, so the volume's cached image features serve both. ``onProgress(job)`` and
        ``onFinished(job)`` are called for this job instead of the panel's callbacks.
        """
        if not volumeNode:
            raise MoMEError(_("Select an input volume."))
        self.scene.check_input_volume(volumeNode)
        roi = self.roiBox(roiNode, volumeNode) if roiNode else None
        options = SegmentationOptions(model=model, device=device, threads=threads, roi=roi, fast=fast,
                                      anatomy_guard=anatomyGuard)
        self.log(_("Computing '{prompt}' in {volume} for the Segment Editor").format(prompt=prompt, volume=volumeNode.GetName()))
        job = start_structure_job(self.workflow(), volumeNode, prompt, options)
        self._jobCallbacks[job.id] = (onProgress, onFinished)
        return job

    def processEvents(self) -> None:
        if self._workflow:
            self._workflow.process_events()
        if self._install:
            self._processInstall()

    def cancel(self) -> None:
        if self._workflow:
            self._workflow.cancel()
        if self._install:
            self._install.cancel()

    def shutdown(self) -> None:
        if self._workflow:
            self._workflow.shutdown()
        if self._install:
            self._install.cancel()  # the process removes its staging folder and exits

    def log(self, text) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    def _onProgress(self, job) -> None:
        callback = self._jobCallbacks[job.id][0] if job.id in self._jobCallbacks else self.progressCallback
        if callback:
            callback(job)

    def _onFinished(self, job) -> None:
        if job.state == JobState.FAILED:
            self.log(_("Segmentation failed: {message}").format(message=job.error))
        else:
            self.log(_("Segmentation {state} after {seconds:.1f} s").format(state=job.state.value, seconds=job.elapsed_s))
        callback = self._jobCallbacks.pop(job.id)[1] if job.id in self._jobCallbacks else self.finishedCallback
        if callback:
            callback(job)

    def showExperts(self, segmentationNode, segmentName, volumeNode):
        """Show which expert each voxel of ``segmentName`` trusted (a result segmented with ``explain``):
        the dominant-expert labelmap, with its colour legend, in the label layer of the slice views and
        the router's entropy as their foreground. Returns ``(labelmapNode, entropyNode)``."""
        labels, entropy = self.scene.experts.show(segmentationNode, segmentName, volumeNode)
        slicer.util.setSliceViewerLayers(label=labels, foreground=entropy, foregroundOpacity=0.3)
        return labels, entropy

    def roiBox(self, roiNode, volumeNode):
        """The ROI as an LPS box in the exported volume's coordinates (both nodes' transforms undone)."""
        return self.scene.roi_box(roiNode, volumeNode)

    def showSegmentation3D(self, segmentationNode, show=True) -> None:
        if not segmentationNode:
            return
        if show:
            segmentationNode.CreateClosedSurfaceRepresentation()
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode:
            displayNode.SetVisibility3D(bool(show))
        layoutManager = slicer.app.layoutManager()
        if show and layoutManager and layoutManager.threeDViewCount > 0:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()


#
# MoMESegmentationTest
#


class MoMESegmentationTest(ScriptedLoadableModuleTest):
    """
    This is the test case for your scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_SegmentSampleCT()
        self.setUp()
        self.test_PanelSegmentsAndLoadsProbabilityMaps()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_SegmentEditorEffectAppliesAndUndoes()

    def _sampleVolume(self):
        import SampleData

        registerSampleData()
        volume = SampleData.downloadSample("MoMEExampleCT")
        self.assertIsNotNone(volume)
        return volume

    def test_PanelSegmentsAndLoadsProbabilityMaps(self):
        """The panel's own widgets: type prompts, tick probability maps and Show experts, press Segment,
        read the table, select a row to see its experts.

        The cases that need Slicer's GUI; the scene logic itself is tested outside Slicer on Slicer's
        MRML core (Testing/Python/test_slicer_scene.py).
        """
        volume = self._sampleVolume()
        slicer.util.selectModule("MoMESegmentation")
        widget = slicer.modules.momesegmentation.widgetRepresentation().self()
        self.assertTrue(widget.logic.ensureDependencies(askConfirmation=False))
        parameters = widget._parameterNode
        parameters.inputVolume = volume
        parameters.prompts = "liver, spleen"
        parameters.probabilities = True
        parameters.showExperts = True
        parameters.fastMode = True
        self.assertEqual(widget.ui.promptEdit.text, "liver, spleen")
        self.assertTrue(widget.ui.segmentButton.enabled)
        widget.ui.segmentButton.click()
        deadline = time.monotonic() + 600
        while widget.logic.busy and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertFalse(widget.logic.busy, "the segmentation did not finish in 10 minutes")
        self.assertEqual(widget.ui.resultsTable.rowCount, 2)
        segmentationNode = parameters.outputSegmentation
        self.assertIsNotNone(segmentationNode)
        names = widget.logic.scene.existing_segment_names(segmentationNode)
        maps = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if n.GetAttribute("MoME.ProbabilityOf")]
        self.assertEqual(sorted(n.GetAttribute("MoME.ProbabilityOf") for n in maps), sorted(names))
        # Show experts: the dominant scale column, and the selected structure's maps in the slice views.
        self.assertFalse(widget.ui.resultsTable.isColumnHidden(ResultRow.EXPLAIN_COLUMN))
        widget.ui.resultsTable.selectRow(1)
        slicer.app.processEvents()
        shown = [n for n in slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode")
                 if n.GetAttribute("MoME.Experts") == "dominant"]
        self.assertEqual(len(shown), 1)
        self.assertTrue(shown[0].GetName().startswith(names[1] if len(names) > 1 else names[0]))
        self.delayDisplay("Panel test passed")

    def test_SegmentEditorEffectAppliesAndUndoes(self):
        """The MoME effect in a Segment Editor widget: prompt from the segment, Apply, live threshold, one Undo.

        Its computation, masking and review are tested outside Slicer on Slicer's MRML core
        (Testing/Python/test_correction.py, test_segment_editor.py); this checks the Qt glue.
        """
        volume = self._sampleVolume()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "Liver")
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(editorNode)
        editor.setSegmentationNode(segmentationNode)
        editor.setSourceVolumeNode(volume)
        editor.setCurrentSegmentID(segmentId)
        editor.setActiveEffectByName("MoME")
        effect = editor.activeEffect()
        self.assertIsNotNone(effect, "the MoME effect is not registered")
        effect = effect.self()
        self.assertEqual(effect.ui.promptEdit.text, "Liver")
        logic = effect.moduleLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        logic.getParameterNode().fastMode = True
        effect.onApply()
        deadline = time.monotonic() + 600
        while logic.busy and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.app.processEvents()
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume).sum()
        self.assertGreater(voxels, 1000, "the effect wrote no liver")
        effect.ui.thresholdSlider.value = 0.9
        effect.onThresholdSettled()
        fewer = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume).sum()
        self.assertLess(fewer, voxels)
        editor.undo()
        self.assertEqual(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume).sum(), 0,
                         "one Undo should remove the effect's whole edit")
        editor.setActiveEffect(None)
        self.delayDisplay("Segment Editor effect test passed")

    def test_CancelLeavesSceneUnchanged(self):
        """Cancel from the panel while the worker runs: node IDs and segment IDs stay as they were."""
        volume = self._sampleVolume()
        logic = MoMESegmentationLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        try:
            before = logic.scene.state()
            job = logic.segment(volume, "liver, spleen, stomach", wait=False, model="demo", device="cpu")
            deadline = time.monotonic() + 300
            while job.stage in ("", "queued") and time.monotonic() < deadline:
                logic.processEvents()
                slicer.app.processEvents()
                time.sleep(0.05)
            logic.cancel()
            self.assertEqual(job.state, JobState.CANCELLED)
            self.assertEqual(logic.scene.state(), before)
        finally:
            logic.shutdown()
        self.delayDisplay("Cancel test passed")

    def test_SegmentSampleCT(self):
        """Segment three organs of the bundled CT with the demo model and check the segments."""
        self.delayDisplay("Starting the test")
        import SampleData

        registerSampleData()
        inputVolume = SampleData.downloadSample("MoMEExampleCT")
        self.assertIsNotNone(inputVolume)
        self.delayDisplay("Loaded the sample CT")

        logic = MoMESegmentationLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        try:
            job = logic.segment(inputVolume, "liver, spleen, left kidney", wait=True, model="demo", device="auto")
        finally:
            logic.shutdown()
        self.assertEqual(job.state, JobState.DONE)
        segmentationNode = job.result_ref
        self.assertIsNotNone(segmentationNode)

        structures = job.summary["structures"]
        self.assertEqual([s["id"] for s in structures], ["liver", "spleen", "kidney_left"])
        found = [s["name"] for s in structures if s["found"]]
        self.assertTrue(found, "the demo model found none of liver, spleen, left kidney")
        self.assertEqual(sorted(logic.scene.existing_segment_names(segmentationNode)), sorted(found))
        segmentation = segmentationNode.GetSegmentation()
        for name in found:
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, inputVolume)
            self.assertGreater(int(mask.sum()), 0, f"segment {name} is empty")
        self.delayDisplay("Test passed")
