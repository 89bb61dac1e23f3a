"""The Slicer module checked without Slicer.

* the module file parses, follows the template's order, and uses only API that exists in Slicer
  (name lists in ``data/slicer_reference``, read from Slicer's and CTK's sources);
* its file-layout lookup finds Resources/ and MoMESegmentationLib both in the source tree and in a
  built extension; the module imports with Slicer replaced by stand-ins;
* the .ui loads with PySide6 (Slicer's widgets rewritten to Qt base classes), every ``self.ui.NAME``
  exists, every ``SlicerParameterName`` is a parameter-node field, and the panel renders to a PNG;
* the pure glue: IJK-to-RAS <-> LPS geometry (checked against VTK), ROI box, segment naming,
  results table, model cards, completion and the dependency check.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
import tempfile
import types
import unittest
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from MoMESegmentationLib.registry import ModelEntry  # noqa: E402
from MoMESegmentationLib.slicer_workflow import (  # noqa: E402
    ResultRow,
    completion_terms,
    ijk_to_ras_from_lps_geometry,
    load_model_cards,
    lps_geometry_from_ijk_to_ras,
    missing_requirements,
    model_card_html,
    plan_segment_names,
    read_nrrd_geometry,
    result_rows,
    roi_box_lps,
    update_recent_prompts,
)

MODULE_PATH = REPO / "MoMESegmentation" / "MoMESegmentation.py"
UI_PATH = REPO / "Resources" / "UI" / "MoMESegmentation.ui"
EFFECT_PATH = REPO / "MoMESegmentation" / "SegmentEditorMoMELib" / "SegmentEditorEffect.py"
EFFECT_UI_PATH = REPO / "Resources" / "UI" / "SegmentEditorMoME.ui"
REFERENCE = Path(__file__).resolve().parent / "data" / "slicer_reference"
IN_SLICER = hasattr(sys.modules.get("slicer"), "app")


def _names(filename: str) -> set[str]:
    lines = (REFERENCE / filename).read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_PATH.read_text(encoding="utf-8"), filename=str(MODULE_PATH))


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _vtk_method_names() -> set[str]:
    """Method names carried by the classes of VTK's core modules (what MRML classes inherit)."""
    names: set[str] = set()
    try:
        from vtkmodules import vtkCommonCore, vtkCommonDataModel, vtkCommonMath, vtkCommonTransforms
    except ImportError:
        return names
    for module in (vtkCommonCore, vtkCommonDataModel, vtkCommonMath, vtkCommonTransforms):
        for class_name in dir(module):
            if class_name.startswith("vtk"):
                names.update(n for n in dir(getattr(module, class_name)) if n[:1].isupper())
    return names


def _slicer_core_method_names() -> set[str]:
    """Method names of Slicer's wrapped MRML / Logic classes where slicer-core is installed (macro-made
    accessors such as ``GetSelectedSegmentID`` are not in the header scan)."""
    try:
        import slicer
    except ImportError:
        return set()
    names: set[str] = set()
    for class_name in dir(slicer):
        if class_name.startswith(("vtkMRML", "vtkSlicer", "vtkSegment", "vtkOrientedImage")):
            names.update(n for n in dir(getattr(slicer, class_name)) if n[:1].isupper())
    return names


def unknown_slicer_api(tree: ast.Module) -> tuple[set[str], list[str]]:
    """``slicer.util`` / ``slicer.packaging`` functions a source calls, and those Slicer lacks."""
    api = _names("slicer_api_names.txt")
    used = set()
    for node in ast.walk(tree):
        name = _dotted(node) if isinstance(node, ast.Attribute) else None
        if name and name.startswith(("slicer.util.", "slicer.packaging.")):
            used.add(name[len("slicer."):])
    return used, sorted(used - api)


def unknown_classes(source: str) -> tuple[set[str], list[str]]:
    """Slicer / CTK class names a source (Python or .ui) uses, and those Slicer and CTK lack."""
    classes = _names("slicer_class_names.txt") | _names("ctk_class_names.txt")
    used = set(re.findall(r"\b((?:vtkMRML|qMRML|qSlicer|vtkSlicer|ctk)[A-Za-z0-9]+)\b", source))
    # Python modules of Slicer's wrapped libraries (``import qSlicer...PythonQt as ...``) are not classes.
    modules = {name for match in re.findall(r"^\s*import\s+(\w+)(?:\s+as\s+(\w+))?", source, re.M) for name in match}
    return used - modules, sorted(used - modules - classes)


def unknown_methods(tree: ast.Module) -> list[str]:
    """Upper-case method calls (C++ / VTK style) that neither Slicer, CTK nor VTK define."""
    known = (_names("slicer_method_names.txt") | _names("slicer_class_names.txt") | _vtk_method_names()
             | _slicer_core_method_names())
    local = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    unknown = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        method, owner = node.func.attr, _dotted(node.func.value)
        if not method[:1].isupper() or method in local | imported:
            continue
        if owner in modules - {"slicer"}:
            continue  # class constructors of imported modules (qt.QTimer, vtk.vtkMatrix4x4, pathlib.Path)
        if owner == "slicer" and method.startswith(("vtkMRML", "vtkSlicer", "qMRML", "qSlicer")):
            continue  # classes, checked by unknown_classes
        if method not in known:
            unknown.add(f"{owner}.{method}")
    return sorted(unknown)


class ModuleSourceTest(unittest.TestCase):
    """Static checks of MoMESegmentation.py."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.tree = _module_tree()
        cls.classes = [n.name for n in cls.tree.body if isinstance(n, ast.ClassDef)]

    def test_template_order(self):
        expected = ["MoMESegmentation", "MoMESegmentationParameterNode", "MoMESegmentationWidget",
                    "MoMESegmentationLogic", "MoMESegmentationTest"]
        self.assertEqual([c for c in self.classes if c in expected], expected)
        bases = {n.name: [_dotted(b) for b in n.bases] for n in self.tree.body if isinstance(n, ast.ClassDef)}
        self.assertIn("ScriptedLoadableModule", bases["MoMESegmentation"])
        self.assertIn("ScriptedLoadableModuleWidget", bases["MoMESegmentationWidget"])
        self.assertIn("ScriptedLoadableModuleLogic", bases["MoMESegmentationLogic"])
        self.assertIn("ScriptedLoadableModuleTest", bases["MoMESegmentationTest"])
        wrapper = next(n for n in self.tree.body if isinstance(n, ast.ClassDef) and n.name == "MoMESegmentationParameterNode")
        self.assertIn("parameterNodeWrapper", [_dotted(d) for d in wrapper.decorator_list])

    def test_no_heavy_imports_at_module_level(self):
        top_level = set()
        for node in self.tree.body:
            if isinstance(node, ast.Import):
                top_level.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                top_level.add(node.module.split(".")[0])
        self.assertFalse(top_level & {"torch", "monai", "transformers", "SimpleITK", "nibabel", "PyTorchUtils"})

    def test_user_strings_are_translatable(self):
        """Titles, messages and labels given to Slicer go through _()."""
        untranslated = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and _dotted(node.func) in (
                    "slicer.util.errorDisplay", "slicer.util.confirmOkCancelDisplay", "slicer.util.tryWithErrorDisplay"):
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    untranslated.append(first.value)
            if isinstance(node, ast.Assign) and any(_dotted(t) in ("self.parent.title", "self.parent.helpText")
                                                    for t in node.targets):
                if isinstance(node.value, ast.Constant):
                    untranslated.append(node.value.value)
        self.assertEqual(untranslated, [])

    def test_slicer_api_calls_exist(self):
        used, unknown = unknown_slicer_api(self.tree)
        self.assertTrue(used, "the module calls slicer.util")
        self.assertEqual(unknown, [], "slicer.util/packaging functions that Slicer does not have")

    def test_mrml_and_ctk_classes_exist(self):
        used, unknown = unknown_classes(MODULE_PATH.read_text(encoding="utf-8") + UI_PATH.read_text(encoding="utf-8"))
        self.assertIn("qMRMLNodeComboBox", used)
        self.assertEqual(unknown, [], "classes that Slicer/CTK do not have")

    def test_upper_case_methods_exist(self):
        self.assertEqual(unknown_methods(self.tree), [], "upper-case methods that neither Slicer, CTK nor VTK define")

    def test_dependencies_are_not_installed_at_import(self):
        """pip/PyTorch installation happens only inside Logic methods."""
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    self.assertNotIn("pip", (_dotted(call.func) or "").lower())


class ModuleLayoutTest(unittest.TestCase):
    """findModuleLayout(): source tree and built extension."""

    @classmethod
    def setUpClass(cls) -> None:
        function = next(n for n in _module_tree().body if isinstance(n, ast.FunctionDef) and n.name == "findModuleLayout")
        namespace: dict = {}
        exec(compile(ast.Module(body=[function], type_ignores=[]), str(MODULE_PATH), "exec"), namespace)
        cls.find = staticmethod(namespace["findModuleLayout"])

    def test_source_tree(self):
        layout = self.find(str(REPO / "MoMESegmentation"))
        self.assertEqual(Path(layout["resources"]), REPO / "Resources")
        self.assertEqual(Path(layout["libraryParent"]), REPO)

    def test_built_extension_prefers_files_beside_the_module(self):
        with tempfile.TemporaryDirectory() as temp:
            module_dir = Path(temp) / "lib" / "qt-scripted-modules"
            (module_dir / "Resources" / "UI").mkdir(parents=True)
            (module_dir / "Resources" / "UI" / "MoMESegmentation.ui").write_text("<ui/>")
            (module_dir / "MoMESegmentationLib").mkdir()
            (module_dir / "MoMESegmentationLib" / "__init__.py").write_text("")
            # a decoy one folder up must not win
            (module_dir.parent / "Resources" / "UI").mkdir(parents=True)
            (module_dir.parent / "Resources" / "UI" / "MoMESegmentation.ui").write_text("<ui/>")
            layout = self.find(str(module_dir))
            self.assertEqual(Path(layout["resources"]), module_dir / "Resources")
            self.assertEqual(Path(layout["libraryParent"]), module_dir)

    def test_missing_files(self):
        with tempfile.TemporaryDirectory() as temp:
            self.assertEqual(self.find(temp), {"resources": None, "libraryParent": None})


class _Stub:
    """Accepts any attribute access and call (stands in for slicer, qt, vtk objects)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _Stub()

    def __call__(self, *args, **kwargs):
        return _Stub()


@unittest.skipIf(IN_SLICER, "replaces the slicer module; only meaningful outside Slicer")
class ModuleImportTest(unittest.TestCase):
    """Import the module file with Slicer replaced by stand-ins, from the source tree."""

    def test_import_from_source_tree(self):
        saved = {name: sys.modules.get(name) for name in
                 ("slicer", "slicer.i18n", "slicer.ScriptedLoadableModule", "slicer.util",
                  "slicer.parameterNodeWrapper", "qt", "vtk", "MoMESegmentation")}
        saved_path = list(sys.path)
        try:
            slicer = types.ModuleType("slicer")
            slicer.app = _Stub()
            for name in ("vtkMRMLMarkupsROINode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
                setattr(slicer, name, type(name, (), {}))
            i18n = types.ModuleType("slicer.i18n")
            i18n.tr = lambda text: text
            i18n.translate = lambda context, text: text
            slm = types.ModuleType("slicer.ScriptedLoadableModule")
            for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                         "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
                setattr(slm, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
            slm.__all__ = [n for n in dir(slm) if n.startswith("Scripted")]
            util = types.ModuleType("slicer.util")
            util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
            pnw = types.ModuleType("slicer.parameterNodeWrapper")
            pnw.parameterNodeWrapper = lambda cls: cls
            sys.modules.update({"slicer": slicer, "slicer.i18n": i18n, "slicer.ScriptedLoadableModule": slm,
                                "slicer.util": util, "slicer.parameterNodeWrapper": pnw,
                                "qt": types.ModuleType("qt"), "vtk": types.ModuleType("vtk")})
            sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
            for name in [n for n in sys.modules if n.startswith(("MoMESegmentationLib", "MoMESlicer"))]:
                saved.setdefault(name, sys.modules.pop(name))
            spec = importlib.util.spec_from_file_location("MoMESegmentation", MODULE_PATH)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self.assertEqual(Path(module.MODULE_LAYOUT["resources"]), REPO / "Resources")
            self.assertIn(str(REPO), sys.path, "the library's parent folder must be put on sys.path")
            self.assertEqual(Path(module.moduleResourcePath("UI", "MoMESegmentation.ui")), UI_PATH)
            self.assertEqual([d.value for d in module.Device], ["auto", "cuda", "cpu"])
            # The icon comes from the module's resource lookup, also from a source checkout, where
            # ScriptedLoadableModule's own lookup (Resources/Icons beside the module file) finds nothing.
            sys.modules["qt"].QIcon = lambda path: ("QIcon", path)
            descriptor = module.MoMESegmentation.__new__(module.MoMESegmentation)
            descriptor.parent = types.SimpleNamespace()
            module.MoMESegmentation.__init__(descriptor, descriptor.parent)
            self.assertEqual(descriptor.parent.icon, ("QIcon", str(REPO / "Resources" / "Icons" / "MoMESegmentation.png")))
            self.assertTrue((REPO / "Resources" / "Icons" / "MoMESegmentation.png").is_file())
            self.assertFalse((MODULE_PATH.parent / "Resources").exists(), "the source tree keeps Resources/ one folder up")
            logic = module.MoMESegmentationLogic()
            self.assertIn("demo", [card.name for card in logic.modelCards()])
            self.assertIn("not for diagnosis", logic.modelCardHtml("demo"))
            self.assertIn("CPU threads", logic.deviceNote(2))
        finally:
            sys.path[:] = saved_path
            # Library modules first imported here hold the stand-ins (e.g. a module that imported `slicer` at load time):
            # drop them, so that later imports get the real ones.
            for name in [n for n in sys.modules
                         if n.startswith(("MoMESegmentationLib", "MoMESlicer")) and n not in saved]:
                del sys.modules[name]
            for name, value in saved.items():
                if value is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = value


def _load_preview_script():
    spec = importlib.util.spec_from_file_location("render_panel_preview", REPO / "scripts" / "render_panel_preview.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PanelUiTest(unittest.TestCase):
    """The .ui file: names used by the code, parameter bindings, and an offscreen render."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.xml = UI_PATH.read_text(encoding="utf-8")
        cls.preview = _load_preview_script()

    def test_code_uses_only_existing_widgets(self):
        used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", MODULE_PATH.read_text(encoding="utf-8")))
        names = self.preview.ui_widget_names(self.xml)
        self.assertTrue(used)
        self.assertEqual(sorted(used - names), [], "widgets the module uses but the .ui lacks")

    def test_parameter_bindings_match_parameter_node(self):
        wrapper = next(n for n in _module_tree().body
                       if isinstance(n, ast.ClassDef) and n.name == "MoMESegmentationParameterNode")
        fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
        bound = set(re.findall(r'<property name="SlicerParameterName" stdset="0">\s*<string>([^<]+)</string>', self.xml))
        self.assertEqual(sorted(bound - fields), [], "SlicerParameterName values without a parameter")
        self.assertGreaterEqual(len(bound), 9)
        self.assertEqual(sorted(fields - bound), ["model"], "only the model list is filled and bound in code")

    def test_results_table_columns_match_the_rows(self):
        """The .ui's results table has the columns the module fills from ``ResultRow``."""
        table = re.search(r'<widget class="QTableWidget" name="resultsTable">(.*?)</widget>', self.xml, re.S)
        self.assertIsNotNone(table)
        count = re.search(r'<property name="columnCount">\s*<number>(\d+)</number>', table.group(1))
        headers = re.findall(r'<column>\s*<property name="text">\s*<string>([^<]*)</string>', table.group(1))
        self.assertEqual(tuple(headers), ResultRow.HEADERS)
        self.assertEqual(int(count.group(1)), len(ResultRow.HEADERS))

    def test_rewrite_removes_custom_classes(self):
        rewritten = self.preview.rewrite_custom_widgets(self.xml)
        self.assertNotRegex(rewritten, r'class="(qMRML|ctk)')
        self.assertEqual(self.preview.ui_widget_names(rewritten), self.preview.ui_widget_names(self.xml))

    def test_loads_and_renders_offscreen(self):
        try:
            import PySide6  # noqa: F401
        except ImportError:
            self.skipTest("PySide6 is not installed")
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        from PySide6.QtGui import QImage
        from PySide6.QtWidgets import QWidget

        app, widget = self.preview.load_panel(UI_PATH)
        loaded = {w.objectName() for w in widget.findChildren(QWidget)}
        for name in ("inputVolumeSelector", "promptEdit", "modelSelector", "deviceSelector", "roiSelector",
                     "outputSegmentationSelector", "segmentButton", "cancelButton", "progressBar", "statusLabel",
                     "logTextEdit", "resultsTable", "modelCardBrowser", "show3DButton"):
            self.assertIn(name, loaded)
        with tempfile.TemporaryDirectory() as temp:
            path = self.preview.render(Path(temp) / "panel.png")
            image = QImage(str(path))
            self.assertFalse(image.isNull())
            self.assertGreater(image.height(), 600)
            self.assertGreater(image.width(), 300)


class EffectTest(unittest.TestCase):
    """The "MoME" Segment Editor effect: its source against Slicer's names, its .ui, its registration."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.source = EFFECT_PATH.read_text(encoding="utf-8")
        cls.tree = ast.parse(cls.source, filename=str(EFFECT_PATH))
        cls.xml = EFFECT_UI_PATH.read_text(encoding="utf-8")
        cls.preview = _load_preview_script()

    def test_slicer_names_exist(self):
        used, unknown = unknown_slicer_api(self.tree)
        self.assertIn("util.loadUI", used)
        self.assertEqual(unknown, [], "slicer.util functions that Slicer does not have")
        used, unknown = unknown_classes(self.source + self.xml)
        self.assertTrue({"qMRMLSegmentEditorWidget", "qSlicerSegmentEditorAbstractEffect", "ctkPathLineEdit"} <= used)
        self.assertEqual(unknown, [], "classes that Slicer/CTK do not have")
        self.assertEqual(unknown_methods(self.tree), [], "upper-case methods that neither Slicer, CTK nor VTK define")

    def test_effect_follows_slicers_scripted_effect_interface(self):
        effect = next(n for n in self.tree.body if isinstance(n, ast.ClassDef) and n.name == "SegmentEditorEffect")
        self.assertEqual([_dotted(b) for b in effect.bases], ["AbstractScriptedSegmentEditorEffect"])
        methods = {n.name for n in effect.body if isinstance(n, ast.FunctionDef)}
        self.assertLessEqual({"__init__", "clone", "icon", "helpText", "setupOptionsFrame", "setMRMLDefaults",
                              "updateGUIFromMRML", "updateMRMLFromGUI", "activate", "deactivate"}, methods)
        # every edit goes through the editor's modifier and undo, never around them
        self.assertNotRegex(self.source, r"updateSegmentBinaryLabelmapFromArray|SetBinaryLabelmapToSegment")
        for name in ("modifySegmentByLabelmap", "saveStateForUndo", "defaultModifierLabelmap"):
            self.assertIn(f"self.effect.{name}(", self.source)

    def test_code_uses_only_existing_widgets(self):
        used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", self.source))
        names = self.preview.ui_widget_names(self.xml)
        self.assertGreater(len(used), 15)
        self.assertEqual(sorted(used - names), [], "widgets the effect uses but its .ui lacks")

    def test_module_registers_the_effect_file(self):
        module = MODULE_PATH.read_text(encoding="utf-8")
        self.assertIn('slicer.app.connect("startupCompleted()", registerEditorEffect)', module)
        match = re.search(r'os\.path\.join\(os\.path\.dirname\(os\.path\.abspath\(__file__\)\), "([^"]+)", "([^"]+)"\)',
                          module)
        self.assertIsNotNone(match)
        self.assertEqual(MODULE_PATH.parent / match.group(1) / match.group(2), EFFECT_PATH)

    def test_cmake_installs_every_python_file_beside_the_module(self):
        cmake = (REPO / "MoMESegmentation" / "CMakeLists.txt").read_text(encoding="utf-8")
        listed = set(re.findall(r"^\s+([\w/]+\.py)\s*$", cmake, re.M))
        if "${MODULE_NAME}.py" in cmake:
            listed.add(MODULE_PATH.name)
        present = {str(p.relative_to(MODULE_PATH.parent)) for p in MODULE_PATH.parent.rglob("*.py")}
        self.assertEqual(sorted(present - listed), [], "Python files the extension would not install")

    def test_loads_and_renders_offscreen(self):
        try:
            import PySide6  # noqa: F401
        except ImportError:
            self.skipTest("PySide6 is not installed")
        from PySide6.QtGui import QImage
        from PySide6.QtWidgets import QWidget

        self.assertNotRegex(self.preview.rewrite_custom_widgets(self.xml), r'class="(qMRML|ctk)')
        app, widget = self.preview.load_panel(EFFECT_UI_PATH)
        loaded = {w.objectName() for w in widget.findChildren(QWidget)}
        used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", self.source))
        self.assertEqual(sorted(used - loaded), [])
        with tempfile.TemporaryDirectory() as temp:
            widget.resize(400, 640)
            path = Path(temp) / "effect.png"
            self.assertTrue(widget.grab().save(str(path)))
            image = QImage(str(path))
            self.assertFalse(image.isNull())
            self.assertEqual((image.width(), image.height()), (400, 640))


class GeometryTest(unittest.TestCase):
    """IJK-to-RAS <-> LPS spacing/origin/direction, checked against VTK's own matrix arithmetic."""

    def matrices(self):
        vtk = self._vtk()
        cases = []
        for angles, scale, flip in (((0, 0, 0), (1.0, 1.0, 1.0), (1, 1, 1)),
                                    ((0, 0, 0), (0.7, 0.7, 2.5), (-1, -1, 1)),  # DICOM-like axial (LPS grid)
                                    ((17, -31, 55), (0.8, 1.1, 3.0), (1, -1, 1)),  # oblique and flipped
                                    ((90, 0, 180), (2.0, 2.0, 2.0), (-1, 1, -1))):
            transform = vtk.vtkTransform()
            transform.Translate(-120.5, 33.0, 7.25)
            transform.RotateX(angles[0])
            transform.RotateY(angles[1])
            transform.RotateZ(angles[2])
            transform.Scale(scale[0] * flip[0], scale[1] * flip[1], scale[2] * flip[2])
            matrix = vtk.vtkMatrix4x4()
            matrix.DeepCopy(transform.GetMatrix())
            cases.append((matrix, np.array(scale)))
        return cases

    @staticmethod
    def _vtk():
        try:
            import vtk
        except ImportError:
            raise unittest.SkipTest("vtk is not installed") from None
        return vtk

    def test_round_trip_and_voxel_positions(self):
        for matrix, scale in self.matrices():
            spacing, origin, direction = lps_geometry_from_ijk_to_ras(matrix)
            np.testing.assert_allclose(spacing, scale, atol=1e-9)
            np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-9)
            for index in ((0, 0, 0), (3, 5, 7), (-1.5, 2.25, 10)):
                ras = matrix.MultiplyPoint((*index, 1.0))[:3]
                lps = origin + direction @ (spacing * np.array(index))
                np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)
            back = ijk_to_ras_from_lps_geometry(spacing, origin, direction)
            expected = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
            np.testing.assert_allclose(back, expected, atol=1e-9)

    def test_agrees_with_volume_convention(self):
        from MoMESegmentationLib.io.volume import Volume

        for matrix, _ in self.matrices():
            spacing, origin, direction = lps_geometry_from_ijk_to_ras(matrix)
            volume = Volume(np.zeros((2, 2, 2)), spacing, origin, direction)
            expected = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
            np.testing.assert_allclose(volume.affine_ras, expected, atol=1e-9)

    def test_rejects_degenerate_matrix(self):
        with self.assertRaises(ValueError):
            lps_geometry_from_ijk_to_ras(np.diag([1.0, 0.0, 1.0, 1.0]))
        with self.assertRaises(ValueError):
            lps_geometry_from_ijk_to_ras(np.eye(3))

    def test_roi_box_of_rotated_roi_under_a_transform(self):
        vtk = self._vtk()
        corners = np.array([[x, y, z] for x in (10, 30) for y in (-5, 5) for z in (100, 140)], float)
        self.assertEqual(roi_box_lps(corners), [[-30.0, -5.0, 100.0], [-10.0, 5.0, 140.0]])
        to_volume = vtk.vtkTransform()
        to_volume.RotateZ(90)
        box = np.array(roi_box_lps(corners, to_volume.GetMatrix()))
        rotated = corners @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float).T  # z-rotation by 90 deg
        lps = rotated * [-1, -1, 1]
        np.testing.assert_allclose(box, [lps.min(axis=0), lps.max(axis=0)], atol=1e-9)
        with self.assertRaises(ValueError):
            roi_box_lps(np.zeros((8, 3)))

    def test_nrrd_header_geometry(self):
        matrix, _ = self.matrices()[2]
        spacing, origin, direction = lps_geometry_from_ijk_to_ras(matrix)
        def text(values):
            return "(" + ",".join(repr(float(v)) for v in values) + ")"

        vectors = " ".join(text(direction[:, a] * spacing[a]) for a in range(3))
        ras_vectors = " ".join(text(np.diag([-1, -1, 1]) @ direction[:, a] * spacing[a]) for a in range(3))
        ras_origin = np.diag([-1, -1, 1]) @ origin
        with tempfile.TemporaryDirectory() as temp:
            lps_file = Path(temp) / "a.nrrd"
            lps_file.write_bytes(("NRRD0004\n# comment\ntype: uint8\ndimension: 3\nspace: left-posterior-superior\n"
                                  f"sizes: 4 3 2\nspace directions: {vectors}\nkinds: domain domain domain\n"
                                  f"Segment0_Name:=a: b\nencoding: raw\nspace origin: {text(origin)}\n\n"
                                  ).encode() + bytes(24))
            ras_file = Path(temp) / "b.seg.nrrd"
            ras_file.write_bytes(("NRRD0004\ntype: uint8\ndimension: 4\nspace: right-anterior-superior\n"
                                  f"sizes: 2 4 3 2\nspace directions: none {ras_vectors}\nkinds: list domain domain domain\n"
                                  f"encoding: raw\nspace origin: {text(ras_origin)}\n\n").encode() + bytes(48))
            a, b = read_nrrd_geometry(lps_file), read_nrrd_geometry(ras_file)
            self.assertEqual(a.shape, (4, 3, 2))
            self.assertEqual(b.shape, (4, 3, 2))
            self.assertTrue(a.same_grid(b))
            expected = np.eye(4)
            expected[:3, :3], expected[:3, 3] = direction * spacing, origin
            np.testing.assert_allclose(a.ijk_to_lps, expected, atol=1e-9)
            (Path(temp) / "c.nrrd").write_text("P5\n")
            with self.assertRaisesRegex(Exception, "not a NRRD"):
                read_nrrd_geometry(Path(temp) / "c.nrrd")


class PureHelpersTest(unittest.TestCase):
    def test_plan_segment_names(self):
        plan = plan_segment_names(["Liver", "Spleen", "Liver"], ["Liver", "Liver (2)"], replace=False)
        self.assertEqual([p.name for p in plan], ["Liver (3)", "Spleen", "Liver (4)"])
        self.assertFalse(any(p.replaces_existing for p in plan))
        plan = plan_segment_names(["Liver", "Spleen"], ["Liver"], replace=True)
        self.assertEqual([(p.name, p.replaces_existing) for p in plan], [("Liver", True), ("Spleen", False)])

    def test_result_rows(self):
        summary = {"structures": [
            {"prompt": "liver", "name": "Liver", "similarity": 1.0, "found": True, "volume_ml": 1500.25,
             "mean_probability": 0.931, "uncertain_ml": 41.26},
            {"prompt": "kidny", "name": "Kidney left", "similarity": 0.74, "found": False},
            {"prompt": "bladder", "name": "Urinary bladder", "found": False, "rule": "region",
             "note": "scan covers chest only; urinary bladder lies in the pelvis"},
            {"prompt": "spleen", "name": "Spleen", "found": False, "rule": "empty", "mean_probability": 0.0,
             "uncertain_ml": 3.04, "note": "no voxels above threshold"},
            "junk"]}
        rows = result_rows(summary)
        self.assertEqual(rows[0].cells(), ("liver", "Liver", "1500.2", "0.93", "41.3", "yes", "", "-"))
        # A summary without the figure (an older worker) shows none, not 0.
        self.assertEqual(rows[1].cells(), ("kidny", "Kidney left (0.74)", "-", "-", "-", "no", "", "-"))
        self.assertEqual(rows[2].cells()[-2], "[region] scan covers chest only; urinary bladder lies in the pelvis")
        # A structure that is not found still shows where the model was unsure.
        self.assertEqual(rows[3].cells(), ("spleen", "Spleen", "-", "-", "3.0", "no",
                                           "[empty] no voxels above threshold", "-"))
        self.assertEqual(len(ResultRow.HEADERS), len(rows[0].cells()))
        column = ResultRow.HEADERS.index("Uncertain (mL)")
        self.assertEqual(ResultRow.HEADERS[column - 1], "Mean probability")
        self.assertEqual([row.cells()[column] for row in rows], ["41.3", "-", "-", "3.0"])
        self.assertEqual(result_rows(None), [])

    def test_result_rows_from_an_engine_summary(self):
        """The table reads what the engine writes: the summary's keys, not a copy of them."""
        try:
            from MoMESegmentationLib.engine import StructureResult
        except ImportError:  # the engine needs torch, which Slicer may not have yet
            self.skipTest("torch is not installed")

        structures = [
            StructureResult(1, "liver", "liver", "Liver", "liver", 1.0, True, (1, 2, 3), None, 1382.4, 0.878,
                            21600, uncertain_ml=414.72),
            StructureResult(2, "spleen", "spleen", "Spleen", "spleen", 1.0, False, (1, 2, 3), None, 0.0, 0.0,
                            0, note="no voxels above threshold", rule="empty", uncertain_ml=12.5)]
        rows = result_rows({"structures": [s.to_json() for s in structures]})
        self.assertEqual([r.cells() for r in rows], [
            ("liver", "Liver", "1382.4", "0.88", "414.7", "yes", "", "-"),
            ("spleen", "Spleen", "-", "-", "12.5", "no", "[empty] no voxels above threshold", "-")])

    def test_result_rows_show_the_dominant_scale_of_an_explained_run(self):
        """With explain, the summary's routing names the dominant expert of each found structure."""
        routing = {"inside": {"full resolution": 0.2, "1/4 scale": 0.8}, "dominant": "1/4 scale"}
        rows = result_rows({"structures": [
            {"prompt": "liver", "name": "Liver", "found": True, "volume_ml": 1.0, "routing": routing},
            {"prompt": "spleen", "name": "Spleen", "found": False, "routing": routing}]})
        column = ResultRow.EXPLAIN_COLUMN
        self.assertEqual(ResultRow.HEADERS[column], "Dominant scale")
        self.assertEqual([r.cells()[column] for r in rows], ["1/4 scale", "-"])
        self.assertEqual([r.dominant_scale for r in rows], ["1/4 scale", None])

    def test_model_cards_are_read_defensively(self):
        cards = load_model_cards(REPO / "Resources" / "models.json")
        self.assertIn("demo", [c.name for c in cards])
        self.assertNotIn("backbone", {c.kind for c in cards})
        with tempfile.TemporaryDirectory() as temp:
            bad = Path(temp) / "models.json"
            bad.write_text("{not json")
            self.assertEqual(load_model_cards(bad), [])
            bad.write_text('{"models": [{"title": "no name"}, 3, {"name": "x", "structures": "liver"}]}')
            self.assertEqual([(c.name, c.structures) for c in load_model_cards(bad)], [("x", ())])
            self.assertEqual(load_model_cards(Path(temp) / "missing.json"), [])
        html = model_card_html(ModelEntry(name="m", title="M <1>", kind="bundled", license="MIT", intended_use=""),
                               installed=False)
        self.assertIn("M &lt;1&gt;", html)
        self.assertIn("Research use, not for diagnosis.", html)
        self.assertIn("Not installed", html)

    def test_completion_terms(self):
        with tempfile.TemporaryDirectory() as temp:
            vocabulary = Path(temp) / "vocabulary.json"
            vocabulary.write_text('{"structures": [{"id": "kidney_left", "name": "Kidney left", "synonyms": ["left kidney"]}]}')
            terms = completion_terms(["liver", "kidney_left"], vocabulary, recent=["liver, spleen"])
            self.assertEqual(terms, ["liver, spleen", "liver", "kidney left", "left kidney"])
            vocabulary.write_text("[broken")
            self.assertEqual(completion_terms(["liver"], vocabulary), ["liver"])
        self.assertEqual(update_recent_prompts(["a", "b", "c"], "b", limit=2), ["b", "a"])

    def test_missing_requirements(self):
        versions = {"torch": "2.3.1+cu121", "monai": "1.6.1", "einops": None}
        missing = missing_requirements(["torch>=2.4", "monai>=1.4", "einops", "scipy"], versions.get)
        self.assertEqual(missing, ["torch>=2.4", "einops", "scipy"])
        self.assertEqual(missing_requirements(["numpy"]), [])  # Slicer ships NumPy; not pytest
        with self.assertRaises(ValueError):
            missing_requirements(["torch<3"], versions.get)


class SupportedSlicerTest(unittest.TestCase):
    """Slicer 5.8 and older run Python 3.9: the module must say so instead of failing later."""

    def test_reason_names_the_python_and_the_slicer_to_use(self):
        from MoMESegmentationLib import unsupported_python_reason

        reason = unsupported_python_reason((3, 9, 10, "final", 0))
        self.assertIn("Python 3.9.10", reason)
        self.assertIn("Slicer 5.10", reason)
        self.assertNotIn("\n", reason)
        self.assertIsNone(unsupported_python_reason((3, 10, 0)))
        self.assertIsNone(unsupported_python_reason((3, 12, 10)))

    def test_what_runs_before_the_check_parses_as_python_3_9(self):
        """The package's __init__, errors.py and the module file up to the check use 3.9 grammar."""
        library = REPO / "MoMESegmentationLib"
        for path in (library / "__init__.py", library / "errors.py"):
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
        head = MODULE_PATH.read_text(encoding="utf-8").split("from MoMESegmentationLib.errors import")[0]
        self.assertIn("unsupported_python_reason()", head)
        ast.parse(head, filename=str(MODULE_PATH), feature_version=(3, 9))

    def test_the_extension_is_not_built_for_older_slicers(self):
        cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
        self.assertRegex(cmake, r'VERSION_LESS "5\.10"\)\s*\n\s*message\(FATAL_ERROR')


class TorchInstallTest(unittest.TestCase):
    """light-the-torch first, pip when it fails; torch is never imported by the installer."""

    def test_a_failing_light_the_torch_falls_through_to_pip(self):
        from MoMESegmentationLib.slicer_workflow import install_torch

        calls, logs = [], []

        def light_the_torch(requirement):
            calls.append(("ltt", requirement))
            raise RuntimeError("CalledProcessError: light_the_torch returned 1\nmore detail")

        how = install_torch("torch>=2.4", light_the_torch, lambda reqs: calls.append(("pip", reqs)), logs.append)
        self.assertEqual(how, "pip")
        self.assertEqual(calls, [("ltt", "torch>=2.4"), ("pip", ["torch>=2.4"])])
        self.assertEqual(len(logs), 1)
        self.assertIn("trying pip", logs[0])
        self.assertNotIn("more detail", logs[0])

    def test_light_the_torch_when_it_works_and_pip_without_it(self):
        from MoMESegmentationLib.slicer_workflow import install_torch

        calls = []
        self.assertEqual(install_torch("torch", calls.append, lambda reqs: calls.append(reqs)), "light-the-torch")
        self.assertEqual(calls, ["torch"])
        self.assertEqual(install_torch("torch", None, lambda reqs: calls.append(reqs)), "pip")
        self.assertEqual(calls, ["torch", ["torch"]])

    def test_installing_does_not_import_torch(self):
        import subprocess

        code = ("import sys; from MoMESegmentationLib.slicer_workflow import install_torch; "
                "install_torch('torch', lambda r: None, lambda r: None); "
                "install_torch('torch', None, lambda r: None); "
                "sys.exit(3 if 'torch' in sys.modules else 0)")
        done = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)


if __name__ == "__main__":
    unittest.main()
