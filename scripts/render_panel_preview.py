"""Render the MoME Segmentation panel (Resources/UI/MoMESegmentation.ui) to a PNG without Slicer.

Slicer's custom widgets (qMRMLNodeComboBox, ctkCollapsibleButton, ...) are not available outside
Slicer, so a copy of the .ui XML is rewritten to their nearest Qt base classes and loaded with
PySide6's QUiLoader on the offscreen platform. The image is a layout preview, and says so.

    python scripts/render_panel_preview.py [--output docs/images/panel_preview.png]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI_PATH = REPO / "Resources" / "UI" / "MoMESegmentation.ui"
DEFAULT_OUTPUT = REPO / "docs" / "images" / "panel_preview.png"

#: Slicer/CTK widget classes and the Qt classes that stand in for them in the preview.
FALLBACK_CLASSES = {
    "qMRMLWidget": "QWidget",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLSegmentsTableView": "QTableWidget",
    "qMRMLSliderWidget": "QSlider",
    "ctkCollapsibleButton": "QGroupBox",
    "ctkCollapsibleGroupBox": "QGroupBox",
    "ctkCheckBox": "QCheckBox",
    "ctkComboBox": "QComboBox",
    "ctkSliderWidget": "QSlider",
    "ctkPathLineEdit": "QLineEdit",
}

#: Properties of the custom classes that the stand-ins do not have.
_CUSTOM_PROPERTIES = ("nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "renameEnabled",
                      "noneEnabled", "noneDisplay", "collapsed")


def rewrite_custom_widgets(xml: str) -> str:
    """The .ui XML with Slicer/CTK classes replaced by Qt classes and their own properties dropped."""
    # a collapsible button's "text" is a group box's "title"
    xml = re.sub(r'(<widget class="ctkCollapsible(?:Button|GroupBox)" name="[^"]+">\s*<property name=")text(")',
                 r"\1title\2", xml)
    for custom, base in FALLBACK_CLASSES.items():
        xml = xml.replace(f'class="{custom}"', f'class="{base}"')
    xml = re.sub(r"<customwidgets>.*?</customwidgets>", "", xml, flags=re.S)
    xml = re.sub(r"<connections>.*?</connections>", "<connections/>", xml, flags=re.S)
    for name in _CUSTOM_PROPERTIES:
        xml = re.sub(rf'\s*<property name="{name}"[^>]*>.*?</property>', "", xml, flags=re.S)
    return xml


def ui_widget_names(xml: str) -> set[str]:
    """``name`` attributes of every ``<widget>`` in the .ui XML."""
    return set(re.findall(r'<widget class="[^"]+" name="([^"]+)"', xml))


def load_panel(ui_path: Path = UI_PATH):
    """Load the rewritten .ui with QUiLoader; returns ``(app, widget)``."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    data = QByteArray(rewrite_custom_widgets(Path(ui_path).read_text(encoding="utf-8")).encode("utf-8"))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    widget = QUiLoader().load(buffer)
    buffer.close()
    if widget is None:
        raise RuntimeError(f"{ui_path}: QUiLoader could not load the panel")
    return app, widget


def populate(widget) -> None:
    """Fill the controls the way the module does at start-up (model list, device and mode choices)."""
    from PySide6.QtWidgets import QComboBox, QLineEdit, QTableWidget, QTextBrowser

    sys.path.insert(0, str(REPO))
    from MoMESegmentationLib.slicer_workflow import ResultRow, load_model_cards, model_card_html

    def child(kind, name):
        found = widget.findChild(kind, name)
        if found is None:
            raise RuntimeError(f"panel has no {kind.__name__} named {name}")
        return found

    child(QComboBox, "inputVolumeSelector").addItem("MoMEExampleCT")
    child(QLineEdit, "promptEdit").setText("liver, spleen, left kidney")
    cards = load_model_cards(REPO / "Resources" / "models.json")
    models = child(QComboBox, "modelSelector")
    for card in cards:
        models.addItem(card.title, card.name)
    child(QComboBox, "deviceSelector").addItems(["Auto (GPU if available)", "GPU (CUDA)", "CPU"])
    child(QComboBox, "roiSelector").addItem("Whole volume")
    child(QComboBox, "outputSegmentationSelector").addItem("Create new segmentation")
    child(QComboBox, "segmentModeSelector").addItems(["Add new segments (keep existing)",
                                                      "Replace segments with the same name"])
    table = child(QTableWidget, "resultsTable")
    table.setHorizontalHeaderLabels(list(ResultRow.HEADERS))
    table.resizeColumnsToContents()
    if cards:
        child(QTextBrowser, "modelCardBrowser").setHtml(model_card_html(cards[0]))


def render(output: Path = DEFAULT_OUTPUT, ui_path: Path = UI_PATH, width: int = 440) -> Path:
    """Render the panel with a "layout preview" caption to ``output`` (PNG)."""
    app, panel = load_panel(ui_path)
    from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

    populate(panel)
    frame = QWidget()
    layout = QVBoxLayout(frame)
    caption = QLabel("Layout preview: rendered with Qt outside Slicer; Slicer widgets drawn as "
                     "plain Qt stand-ins (node selectors as combo boxes, collapsible sections as group boxes).")
    caption.setWordWrap(True)
    caption.setStyleSheet("background:#fff3c4; color:#5a4500; padding:6px; border:1px solid #d9b800;")
    layout.addWidget(caption)
    layout.addWidget(panel)
    frame.resize(width, frame.sizeHint().height())
    frame.resize(width, max(frame.sizeHint().height(), frame.height()))
    frame.show()
    app.processEvents()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not frame.grab().save(str(output), "PNG"):
        raise RuntimeError(f"{output}: cannot write the PNG")
    frame.close()
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    print(render(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
