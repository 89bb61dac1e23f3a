"""``mome web``: the library side (access rules, uploads) and the app in a real browser.

The browser tests start ``mome web`` as a subprocess (the front, session processes, the real worker
with the demo weights on the bundled CT) and drive Debian's Chromium headless through playwright's
driver (no browser is downloaded). They skip, naming the reason, where Chromium, playwright or
trame-slicer is missing. One browser page (session A) is shared by the tests of this module, in
file order: cancel, segment, bad uploads, a second concurrent session.

Set ``MOME_WEB_SCREENSHOT=path.png`` to keep the page's screenshot after segmenting (docs/WEB.md's
picture is made so).
"""

from __future__ import annotations

import colorsys
import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from MoMESegmentationLib.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SESSION_TIMEOUT_S = 3
MAX_UPLOAD_MB = 3  # the sample CT (2.2 MB) fits, the test's 3.5 MB file does not


# ------------------------------------------------------------------------------------------
# Without a browser
# ------------------------------------------------------------------------------------------


def test_web_cli_imports_without_trame_or_slicer():
    code = ("import sys, MoMESegmentationLib.cli as c, MoMESegmentationLib.web.cli, MoMESegmentationLib.web.uploads; "
            "c.build_parser().parse_args(['web', '--help'])")
    probe = ("import sys, runpy\n"
             "try:\n"
             f"    exec({code!r})\n"
             "except SystemExit:\n"
             "    pass\n"
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trame', 'trame_slicer', 'slicer', 'vtk', "
             "'vtkmodules', 'aiohttp'))\n"
             "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mome web" in out.stdout or "--access-key-file" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_check_bind_needs_a_key_beyond_loopback():
    from MoMESegmentationLib.web.cli import check_bind

    check_bind("127.0.0.1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", "k" * 32)
    with pytest.raises(InputError, match="needs an access key"):
        check_bind("0.0.0.0", None)
    with pytest.raises(InputError, match="needs an access key"):
        check_bind("192.168.1.20", "")
    with pytest.raises(InputError, match="shorter than 16"):
        check_bind("0.0.0.0", "short")


def test_mome_web_refuses_an_open_address_without_a_key():
    env = dict(os.environ)
    env.pop("MOME_WEB_KEY", None)
    out = subprocess.run([sys.executable, "-m", "MoMESegmentationLib.cli", "web", "--host", "0.0.0.0"],
                         capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mome: error: --host 0.0.0.0"), out.stderr
    assert "Traceback" not in out.stderr


def test_upload_names_and_size_limit(tmp_path):
    from MoMESegmentationLib.web.uploads import UploadWriter, safe_upload_name

    assert safe_upload_name("C:\\scans\\my ct.nii.gz") == "my_ct.nii.gz"
    assert safe_upload_name("../../etc/ct.nrrd") == "ct.nrrd"
    with pytest.raises(InputError, match=r"^notes\.txt: not a supported scan"):
        safe_upload_name("notes.txt")
    writer = UploadWriter(tmp_path / "a.nii.gz", "a.nii.gz", limit=10)
    writer.write(b"12345")
    with pytest.raises(InputError, match=r"^a\.nii\.gz: larger than this server's upload limit"):
        writer.write(b"678901")
    assert not (tmp_path / "a.nii.gz").exists()


def test_prepare_scan_checks_format_voxels_and_zips(tmp_path):
    from MoMESegmentationLib.data.sample import sample_ct_path
    from MoMESegmentationLib.io.readers import read_volume
    from MoMESegmentationLib.web.uploads import UploadLimits, prepare_scan

    limits = UploadLimits(max_upload_bytes=10_000_000, max_voxels=10**9)
    nrrd = prepare_scan(sample_ct_path(), tmp_path / "work", limits, "example_ct.nii.gz")
    original, converted = read_volume(sample_ct_path()), read_volume(nrrd)
    assert nrrd.name == "example_ct.nrrd" and converted.shape == original.shape
    assert np.allclose(converted.affine_lps, original.affine_lps, atol=1e-4)
    assert np.array_equal(converted.array, original.array)

    small = UploadLimits(max_upload_bytes=10_000_000, max_voxels=1000)
    with pytest.raises(InputError, match=r"^example_ct\.nii\.gz: .* voxels, more than this server's limit of 1,000$"):
        prepare_scan(sample_ct_path(), tmp_path / "work2", small, "example_ct.nii.gz")

    broken = tmp_path / "upload-17.nii.gz"
    broken.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    with pytest.raises(InputError) as caught:
        prepare_scan(broken, tmp_path / "work3", limits, "broken.nii.gz")
    message = str(caught.value)
    assert message.startswith("broken.nii.gz") and "\n" not in message and "upload-17" not in message

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("../../escape.dcm", b"\0" * 2_000_000)
    with pytest.raises(InputError, match=r"^bomb\.zip: unpacks to more than this server's limit"):
        prepare_scan(bomb, tmp_path / "work4", UploadLimits(max_upload_bytes=1_000_000, max_voxels=10**9))
    assert not (tmp_path / "escape.dcm").exists() and not (tmp_path.parent / "escape.dcm").exists()

    not_dicom = tmp_path / "notes.zip"
    with zipfile.ZipFile(not_dicom, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(InputError) as caught:
        prepare_scan(not_dicom, tmp_path / "work5", limits)
    assert str(caught.value).startswith("notes.zip") and "\n" not in str(caught.value)
    assert not list((tmp_path / "work5").glob("*.unpacked"))


# ------------------------------------------------------------------------------------------
# In the browser
# ------------------------------------------------------------------------------------------


def _browser_skip_reason() -> str | None:
    if not CHROMIUM.is_file():
        return f"Debian's Chromium is not installed ({CHROMIUM}; apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    from MoMESegmentationLib.web.cli import missing_web_requirements

    return missing_web_requirements()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    """``mome web`` on a free loopback port, its session folders under a folder the tests can see."""
    reason = _browser_skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("web")
    port = _free_port()
    log = open(work / "front.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "MoMESegmentationLib.cli", "web", "--port", str(port), "--work-dir", str(work),
         "--session-timeout", str(SESSION_TIMEOUT_S), "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-sessions", "3",
         "--device", "cpu"],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            _get_json(base + "health")
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail("mome web did not start: " + (work / "front.log").read_text(errors="replace")[-2000:])
            time.sleep(0.2)
    yield {"base": base, "work": work}
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()
    # the server removes its own work folder (every session folder in it) when it stops
    assert not [p for p in work.iterdir() if p.name.startswith("mome-web-")], "session folders left behind"


@pytest.fixture(scope="module")
def browser(web_server):
    from playwright.sync_api import sync_playwright

    profile = web_server["work"] / "chromium-profile"
    with sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1500, "height": 900})
        yield {"driver": driver, "context": context}
        context.close()


def _open_session(context, base: str):
    page = context.new_page()
    page.goto(base)
    page.wait_for_selector("#mome-load", timeout=60_000)
    return page


def _session_id(page) -> str:
    return page.url.split("/s/", 1)[1].split("/", 1)[0]


def _session_folders(work: Path) -> list[str]:
    return sorted(p.name for root in work.glob("mome-web-*") for p in root.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def page_a(browser, web_server):
    """Session A with the bundled sample loaded."""
    page = _open_session(browser["context"], web_server["base"])
    page.click("#mome-load")
    page.wait_for_function("document.querySelector('#mome-volume-name').textContent.trim() === 'example_ct'",
                           timeout=60_000)
    page.wait_for_timeout(1500)  # the views' first frames
    return page


def _views(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator("#mome-views").screenshot())).convert("RGB"))


def _quadrants(views: np.ndarray) -> dict[str, np.ndarray]:
    """Quad View: coronal and sagittal on the left, 3D above axial on the right (sliders cut off)."""
    height, width = views.shape[:2]
    h2, w2 = height // 2, width // 2
    return {"coronal": views[:h2 - 40, :w2], "threed": views[:h2, w2:], "sagittal": views[h2:-40, :w2],
            "axial": views[h2:-40, w2:]}


def _hue_mask(image: np.ndarray, rgb: tuple[int, int, int], tolerance_deg: float = 14.0) -> np.ndarray:
    """Pixels of a clearly coloured hue near ``rgb``'s (grey CT and the grey 3D background never match)."""
    pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
    high, low = pixels.max(axis=1), pixels.min(axis=1)
    chroma = high - low
    r, g, b = pixels.T
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    target = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0] * 360
    distance = np.abs((hue - target + 180) % 360 - 180)
    return ((chroma > 0.12) & (distance < tolerance_deg)).reshape(image.shape[:2])


def _reference_sides() -> float:
    """LPS x of the reference liver minus that of the reference spleen (negative: liver on the patient's right)."""
    from MoMESegmentationLib.data.sample import load_sample_ct

    case = load_sample_ct()
    names = {name: value for value, name in case.label_table.items()}
    centres = {}
    for structure in ("liver", "spleen"):
        index = np.argwhere(case.labels.array == names[structure]).mean(axis=0)
        centres[structure] = np.asarray(case.image.index_to_physical(index[None, :])).reshape(-1)[:3]
    return float(centres["liver"][0] - centres["spleen"][0])


def test_cancel_mid_job_leaves_the_views_unchanged(page_a):
    page = page_a
    before = _views(page)
    page.fill("#mome-prompt", "liver, spleen, kidney left, aorta")
    page.click("#mome-segment")
    # mid-job: the worker reports inference progress (after starting and loading the model)
    page.wait_for_function("Number(document.querySelector('#mome-progress').getAttribute('aria-valuenow')) > 0",
                           timeout=180_000)
    page.click("#mome-cancel")
    page.wait_for_function("document.querySelector('#mome-status').textContent.includes('Cancelled')",
                           timeout=30_000)
    page.wait_for_timeout(1500)
    after = _views(page)
    assert page.locator("#mome-results").count() == 0 and page.locator("#mome-segments").count() == 0
    assert page.locator("#mome-error").count() == 0
    assert before.shape == after.shape
    changed = np.abs(before.astype(int) - after.astype(int)).max(axis=2) > 24
    assert changed.mean() < 0.002, f"{changed.mean():.4f} of the view pixels changed after cancelling"


def test_segment_sample_liver_and_spleen(page_a, web_server, tmp_path):
    page = page_a
    page.fill("#mome-prompt", "liver, spleen")
    started = time.monotonic()
    page.click("#mome-segment")
    page.wait_for_selector("#mome-results", timeout=240_000)
    elapsed = time.monotonic() - started
    page.wait_for_timeout(2500)  # the views' frames after the import
    print(f"segmentation in the browser: {elapsed:.1f} s")

    rows = page.locator("#mome-results tr.mome-row").all()
    cells = [[td.inner_text().strip() for td in row.locator("td").all()] for row in rows]
    assert [row[0] for row in cells] == ["liver", "spleen"]
    assert [row[5] for row in cells] == ["yes", "yes"]
    volumes = {row[0]: float(row[2]) for row in cells}
    assert 700 < volumes["liver"] < 2500 and 60 < volumes["spleen"] < 600, volumes
    assert all(0.5 < float(row[3]) <= 1.0 for row in cells)
    assert "2 of 2 structures found" in page.inner_text("#mome-status")

    # the downloads: .seg.nrrd, NIfTI label map and JSON summary of this result
    session = page.url.split("?", 1)[0].rsplit("/", 1)[0] + "/"
    links = [a.get_attribute("href") for a in page.locator("#mome-downloads a").all()]
    assert links == ["download/example_ct_mome.seg.nrrd", "download/example_ct_mome.nii.gz",
                     "download/example_ct_mome.json"]
    files = {}
    for link in links:
        answer = page.request.get(session + link)
        assert answer.ok, (link, answer.status)
        files[link.rsplit("/", 1)[1]] = tmp_path / link.rsplit("/", 1)[1]
        files[link.rsplit("/", 1)[1]].write_bytes(answer.body())
    from MoMESegmentationLib.io.readers import read_volume
    from MoMESegmentationLib.io.segmentation import read_segmentation

    segmentation = read_segmentation(files["example_ct_mome.seg.nrrd"])
    assert [s.name for s in segmentation.segments] == ["Liver", "Spleen"]
    labels = read_volume(files["example_ct_mome.nii.gz"])
    assert labels.shape == segmentation.reference.shape and set(np.unique(labels.array)) >= {1, 2}
    summary = json.loads(files["example_ct_mome.json"].read_text())
    colors = {s["id"]: tuple(s["color"]) for s in summary["structures"]}

    views = _views(page)
    shot = os.environ.get("MOME_WEB_SCREENSHOT")
    if shot:  # 256 colours keep the picture small for the docs
        from PIL import Image

        Image.open(io.BytesIO(page.screenshot())).convert("RGB").quantize(256).save(shot, optimize=True)
    quadrants = _quadrants(views)
    reference_side = _reference_sides()
    for view in ("axial", "threed"):
        image = quadrants[view]
        liver, spleen = _hue_mask(image, colors["liver"]), _hue_mask(image, colors["spleen"])
        assert liver.sum() > 500 and spleen.sum() > 100, (view, liver.sum(), spleen.sum())
        # where the reference labels are: the liver on the patient's right, the spleen on the left;
        # both views show the patient's right on the screen's left (radiological axial, anterior 3D)
        liver_x, spleen_x = np.argwhere(liver)[:, 1].mean(), np.argwhere(spleen)[:, 1].mean()
        assert np.sign(liver_x - spleen_x) == np.sign(reference_side), (view, liver_x, spleen_x)

    # per-segment visibility: hiding the spleen removes its colour from the axial view, showing it brings it back
    toggles = page.locator("#mome-segments .mome-visible input")
    toggles.nth(1).click()
    page.wait_for_timeout(1500)
    hidden = _quadrants(_views(page))["axial"]
    assert _hue_mask(hidden, colors["spleen"]).sum() < 20 and _hue_mask(hidden, colors["liver"]).sum() > 500
    toggles.nth(1).click()
    page.wait_for_timeout(1500)
    assert _hue_mask(_quadrants(_views(page))["axial"], colors["spleen"]).sum() > 100


def test_bad_uploads_show_one_line_errors(page_a, tmp_path):
    page = page_a
    name_before = page.inner_text("#mome-volume-name")
    rows_before = page.locator("#mome-results tr.mome-row").count()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress(b"not a scan at all" * 100))
    page.set_input_files("#mome-upload", str(broken))
    page.wait_for_selector("#mome-error", timeout=30_000)
    message = page.inner_text("#mome-error").strip()
    assert message.startswith("broken.nii.gz") and "\n" not in message, message
    assert "Traceback" not in message and "/tmp" not in message
    assert page.inner_text("#mome-volume-name") == name_before
    assert page.locator("#mome-results tr.mome-row").count() == rows_before

    big = tmp_path / "big.nii.gz"
    big.write_bytes(os.urandom(int(3.5e6)))
    page.set_input_files("#mome-upload", str(big))
    page.wait_for_function("document.querySelector('#mome-error')?.textContent.includes('big.nii.gz')",
                           timeout=30_000)
    message = page.inner_text("#mome-error").strip()
    assert "larger than this server's upload limit of 3 MB" in message and "\n" not in message, message


def test_two_sessions_stay_isolated(browser, page_a, web_server, tmp_path):
    from MoMESegmentationLib.data.sample import sample_ct_path

    work = web_server["work"]
    rows_a = page_a.locator("#mome-results tr.mome-row").count()
    assert rows_a == 2, "runs after the segmentation test"
    # session B: another browser (its own cookies and storage), at the same time as A
    other = browser["driver"].chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    try:
        context_b = other.new_context(viewport={"width": 1500, "height": 900})
        page_b = _open_session(context_b, web_server["base"])
        id_a, id_b = _session_id(page_a), _session_id(page_b)
        assert id_a != id_b and {id_a, id_b} <= set(_session_folders(work))
        # B sees none of A's scan or results
        assert page_b.inner_text("#mome-volume-name").strip() == ""
        assert page_b.locator("#mome-results").count() == 0 and page_b.locator("#mome-downloads").count() == 0
        base_b = page_b.url.split("?", 1)[0].rsplit("/", 1)[0] + "/"
        assert page_b.request.get(base_b + "download/example_ct_mome.seg.nrrd").status == 404
        # B uploads its own scan (the sample CT under another name) through the upload field
        upload = tmp_path / "patient_b.nii.gz"
        shutil.copyfile(sample_ct_path(), upload)
        page_b.set_input_files("#mome-upload", str(upload))
        page_b.wait_for_function("document.querySelector('#mome-volume-name').textContent.trim() === 'patient_b'",
                                 timeout=60_000)
        assert page_b.locator("#mome-error").count() == 0
        scans_b = list((work.glob(f"mome-web-*/{id_b}/scans")).__next__().iterdir())
        assert [p.name for p in scans_b] == ["patient_b.nrrd"]
        # A is as it was: its scan, its results, nothing of B's in its folder
        page_a.wait_for_timeout(500)
        assert page_a.inner_text("#mome-volume-name").strip() == "example_ct"
        assert page_a.locator("#mome-results tr.mome-row").count() == 2
        folder_a = next(work.glob(f"mome-web-*/{id_a}"))
        assert not [p for p in folder_a.rglob("*") if "patient_b" in p.name]
        # B's tab closes: its session ends a few seconds later and its folder is gone; A lives on
        context_b.close()
        deadline = time.monotonic() + SESSION_TIMEOUT_S + 20
        while id_b in _session_folders(work) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert id_b not in _session_folders(work), "session B's folder outlived the session"
        assert id_a in _session_folders(work)
        # The process removes its folder first, then stops its worker and exits: the front counts it
        # until it has exited.
        while _get_json(web_server["base"] + "health")["sessions"] != 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _get_json(web_server["base"] + "health")["sessions"] == 1
        page_a.fill("#mome-prompt", "liv")
        page_a.wait_for_function("document.querySelector('#mome-suggestions').textContent.includes('liver')",
                                 timeout=10_000)
    finally:
        other.close()
