"""The `tagclip show` gallery opened in headless Chromium (Debian's `chromium` package).

The browser is driven over the DevTools protocol through `--remote-debugging-pipe` (file
descriptors 3 and 4, NUL-separated JSON), so the test needs nothing beyond the standard library. It
records every network request, failed load, JavaScript exception and console error while the page
loads, then counts the cards and checks that every thumbnail decoded and every overlay link points
to a PNG of the right size.

Chromium is required, not optional: `.ci/run` installs it before `make test`. When it is missing
the tests fail with the command that installs it.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tagclip_cli.show import MIN_PANEL_WIDTH, PLACEHOLDER_SIZE
from tagclip_cli.writers import tags_schema, write_parquet_atomic

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "--window-size=1200,800",
)


def find_chromium() -> str:
    for name in (os.environ.get("TAGCLIP_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail(
        "Chromium is needed for the gallery tests but was not found on PATH. Install Debian's package "
        "with `apt-get install -y chromium` (.ci/run does this), or set TAGCLIP_CHROMIUM to the binary.",
        pytrace=False,
    )


class Browser:
    """A headless Chromium driven over the DevTools protocol on a pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds() -> None:  # Chromium reads commands on fd 3 and writes replies on fd 4
            read_end, write_end = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.log = profile / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=False, preexec_fn=child_fds,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time; its log: " + self._log_tail())
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe; its log: " + self._log_tail())
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        """Send one command and return its result; events seen meanwhile are kept in self.events."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, after: int, timeout: float = 60.0) -> dict:
        """The first event `method` of `session` at position >= after in self.events."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[after:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


class Page:
    """One tab with Network, Page, Runtime and Log events enabled."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": self.target, "flatten": True})[
            "sessionId"]
        for domain in ("Network", "Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=self.session)
        self.start = len(browser.events)

    def open(self, url: str) -> None:
        """Load url as a new document (via about:blank, so that a change of #hash alone reloads too)."""
        for target in ("about:blank", url):
            self.start = len(self.browser.events)
            result = self.browser.call("Page.navigate", {"url": target}, session=self.session)
            assert not result.get("errorText"), f"{target}: {result['errorText']}"
            self.browser.wait_for("Page.loadEventFired", self.session, self.start)

    def evaluate(self, expression: str):
        result = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, session=self.session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.events[self.start:]
                if e.get("method") == method and e.get("sessionId") == self.session]

    def problems(self) -> list[str]:
        """Failed requests, HTTP errors, requests that left the file system, JS exceptions, console errors."""
        urls = {e["requestId"]: e["request"]["url"] for e in self.events("Network.requestWillBeSent")}
        found = [f"failed request: {urls.get(e['requestId'], '?')}: {e['errorText']}"
                 for e in self.events("Network.loadingFailed")]
        found += [f"external request: {u}" for u in urls.values() if not u.startswith(("file://", "data:"))]
        found += [f"status {e['response']['status']}: {e['response']['url']}"
                  for e in self.events("Network.responseReceived") if e["response"].get("status", 200) >= 400]
        found += [f"exception: {e['exceptionDetails']}" for e in self.events("Runtime.exceptionThrown")]
        found += [f"console.{e['type']}: {e['args']}" for e in self.events("Runtime.consoleAPICalled")
                  if e["type"] in ("error", "assert")]
        found += [f"log {e['entry']['level']}: {e['entry'].get('text')} {e['entry'].get('url', '')}"
                  for e in self.events("Log.entryAdded") if e["entry"]["level"] == "error"]
        return found

    def requested_files(self) -> set[Path]:
        return {Path(unquote(urlparse(e["request"]["url"]).path)) for e in self.events("Network.requestWillBeSent")
                if e["request"]["url"].startswith("file://")}

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target})


# Load every thumbnail on the current page (lazy images are scrolled into view), then describe them.
LOAD_ALL_IMAGES = """
(async () => {
  const imgs = Array.from(document.querySelectorAll('#cards img'));
  for (const img of imgs) { img.loading = 'eager'; img.scrollIntoView(); }
  const deadline = Date.now() + 20000;
  while (!imgs.every(i => i.complete) && Date.now() < deadline) {
    await new Promise(r => setTimeout(r, 50));
  }
  window.scrollTo(0, 0);
  return imgs.map(i => ({src: i.currentSrc || i.src, complete: i.complete, w: i.naturalWidth,
                         h: i.naturalHeight}));
})()
"""

CARDS = """
Array.from(document.querySelectorAll('#cards .card')).map(c => ({
  id: c.dataset.id, failed: c.classList.contains('failed'), href: c.querySelector('a').href,
  tags: Array.from(c.querySelectorAll('.tag')).map(t => t.textContent)}))
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = find_chromium()
    instance = Browser(chromium, tmp_path_factory.mktemp("chromium-profile"))
    yield instance
    instance.close()


# ---- a hand-made run: known tags, masks and one failed image --------------------------------------

CLASSES = ["cat", "person", "cup", "rocket"]
TAGS = {  # image -> (tags, mask classes)
    "astronaut.jpg": (["person", "rocket"], ["person"]),
    "chelsea.jpg": (["cat"], ["cat"]),
    "coffee.jpg": (["cup"], ["cup"]),
    "rocket.jpg": (["rocket"], ["rocket"]),
    "more/tiny & odd #1.png": ([], []),
}


def run_show(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tagclip_cli", "show", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, photo_dir):
    root = tmp_path_factory.mktemp("run")
    images = root / "images"
    shutil.copytree(photo_dir, images)
    (images / "more").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
        images / "more" / "tiny & odd #1.png")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    rows, coco_images, annotations = [], [], []
    for i, (image_id, (tags, masked)) in enumerate(TAGS.items()):
        with Image.open(images / image_id) as im:
            width, height = im.size
        scores = [round(0.1 + 0.2 * k, 2) for k in range(len(CLASSES))]
        rows.append({"index": i, "image_id": image_id, "path": str(images / image_id), "width": width,
                     "height": height, "status": "ok", "error": None, "tags": tags, "scores": scores})
        coco_images.append({"id": i + 1, "file_name": image_id, "width": width, "height": height})
        for name in masked:
            mask = np.zeros((height, width), np.uint8)
            mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1
            encoded = mask_utils.encode(np.asfortranarray(mask))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": CLASSES.index(name) + 1,
                                "segmentation": {"size": [height, width], "counts": encoded["counts"].decode()},
                                "score": 0.7, "area": int(mask.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0})
    rows.append({"index": len(rows), "image_id": "corrupt.jpg", "path": str(images / "corrupt.jpg"), "width": None,
                 "height": None, "status": "failed", "error": "cannot decode image (truncated)", "tags": [],
                 "scores": None})
    schema = tags_schema({"classes": CLASSES})
    write_parquet_atomic([pa.Table.from_pylist(rows, schema=schema)], root / "labels.parquet", schema)
    masks = {"images": coco_images, "annotations": annotations,
             "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
    (root / "masks.json").write_text(json.dumps(masks))
    out = root / "gallery"
    done = run_show("--images", str(images), "--tags", str(root / "labels.parquet"), "--masks",
                    str(root / "masks.json"), "--out", str(out), "--page-size", "4", "--workers", "0")
    assert done.returncode == 0, done.stderr
    return {"out": out, "images": images, "rows": rows}


def expected_overlay_check(overlay: Path, source: Path | None) -> None:
    """Overlays are PNGs whose image part has the source's size (or the placeholder's), legend below."""
    with Image.open(overlay) as im:
        assert im.format == "PNG"
        width, height = im.size
    if source is None:
        part = PLACEHOLDER_SIZE
    else:
        with Image.open(source) as src:
            part = src.size
    assert width == max(part[0], MIN_PANEL_WIDTH), (overlay, width, part)
    assert height > part[1], (overlay, height, part)


def test_gallery_loads_offline_with_one_card_per_image(browser, gallery):
    out, rows = gallery["out"], gallery["rows"]
    page = Page(browser)
    page.open((out / "index.html").as_uri())
    assert page.evaluate("document.body.dataset.ready") == "1"
    assert page.evaluate("document.getElementById('count').textContent") == f"{len(rows)} of {len(rows)} images"
    assert page.evaluate("document.querySelector('.page-label').textContent") == "page 1 of 2"

    seen = []
    for page_number in (1, 2):
        if page_number == 2:
            page.evaluate("document.querySelector('#pager-top .next').click()")
            assert page.evaluate("location.hash") == "#page=2"
        thumbs = page.evaluate(LOAD_ALL_IMAGES)
        cards = page.evaluate(CARDS)
        assert len(cards) == len(thumbs) == (4 if page_number == 1 else len(rows) - 4)
        for thumb in thumbs:
            assert thumb["complete"] and thumb["w"] > 0 and thumb["h"] > 0, thumb
            with Image.open(unquote(urlparse(thumb["src"]).path)) as im:
                assert (thumb["w"], thumb["h"]) == im.size
        seen += cards
    assert [c["id"] for c in seen] == [r["image_id"] for r in rows]  # one card per image, in order
    assert [c["id"] for c in seen if c["failed"]] == ["corrupt.jpg"]
    chelsea = next(c for c in seen if c["id"] == "chelsea.jpg")
    assert chelsea["tags"] == ["cat 0.10"]

    problems = page.problems()
    assert not problems, "\n".join(problems)
    requested = page.requested_files()
    assert all(p.is_relative_to(out) for p in requested), requested  # nothing outside the gallery
    assert len([p for p in requested if p.parent.name == "thumbs"]) == len(rows)

    # every card links to its full-size overlay, a PNG of the right size
    for card, row in zip(seen, rows, strict=True):
        overlay = Path(unquote(urlparse(card["href"]).path))
        assert overlay.parent == out / "overlays" and overlay.is_file()
        source = None if row["status"] == "failed" else gallery["images"] / row["image_id"]
        expected_overlay_check(overlay, source)
    page.close()


def test_class_filter_failed_filter_and_deep_links(browser, gallery):
    out = gallery["out"]
    page = Page(browser)
    page.open((out / "index.html").as_uri() + "#class=rocket")
    assert sorted(c["id"] for c in page.evaluate(CARDS)) == ["astronaut.jpg", "rocket.jpg"]
    options = page.evaluate("Array.from(document.querySelectorAll('#class-filter option')).map(o => o.textContent)")
    assert options == ["all images (6)", "failed (1)", "cat (1)", "cup (1)", "person (1)", "rocket (2)"]
    page.evaluate("const s = document.getElementById('class-filter'); s.value = 'failed';"
                  "s.dispatchEvent(new Event('change'))")
    assert [c["id"] for c in page.evaluate(CARDS)] == ["corrupt.jpg"]
    assert page.evaluate("location.hash") == "#class=failed"
    page.evaluate("const n = document.getElementById('name-filter'); document.getElementById('class-filter').value"
                  " = 'all'; document.getElementById('class-filter').dispatchEvent(new Event('change'));"
                  "n.value = 'ODD'; n.dispatchEvent(new Event('input'))")
    assert [c["id"] for c in page.evaluate(CARDS)] == ["more/tiny & odd #1.png"]
    page.evaluate(LOAD_ALL_IMAGES)
    assert not page.problems(), page.problems()
    page.close()


def test_overlay_opens_in_the_browser(browser, gallery):
    page = Page(browser)
    overlay = gallery["out"] / "overlays" / "0000001_chelsea.png"
    page.open(overlay.as_uri())
    size = page.evaluate("[document.images[0].naturalWidth, document.images[0].naturalHeight]")
    with Image.open(overlay) as im:
        assert tuple(size) == im.size
    assert size[0] == 451
    assert not page.problems(), page.problems()
    page.close()


# ---- a real run: annotate with a random-weight checkpoint, then show -----------------------------


@pytest.mark.slow
def test_annotate_then_show_in_chromium(browser, photo_dir, tiny_checkpoint, tmp_path):
    env = dict(os.environ, TAGCLIP_CACHE_DIR=str(tmp_path / "cache"))
    labels = tmp_path / "labels.parquet"
    annotate = subprocess.run(
        [sys.executable, "-m", "tagclip_cli", "annotate", str(photo_dir), "--vocab", "voc", "--out", str(labels),
         "--checkpoint", str(tiny_checkpoint), "--workers", "0", "--quiet"],
        capture_output=True, text=True, env=env, timeout=600)
    assert annotate.returncode == 0, annotate.stderr
    out = tmp_path / "gallery"
    done = run_show("--images", str(photo_dir), "--tags", str(labels), "--out", str(out), "--workers", "0")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(labels).to_pylist()
    page = Page(browser)
    page.open((out / "index.html").as_uri())
    thumbs = page.evaluate(LOAD_ALL_IMAGES)
    cards = page.evaluate(CARDS)
    assert [c["id"] for c in cards] == [r["image_id"] for r in table]
    assert all(t["complete"] and t["w"] > 0 for t in thumbs)
    for card, row in zip(cards, table, strict=True):
        assert [t.rsplit(" ", 1)[0] for t in card["tags"]] == row["tags"]
        expected_overlay_check(Path(unquote(urlparse(card["href"]).path)), photo_dir / row["image_id"])
    assert not page.problems(), page.problems()
    page.close()


def test_thousands_of_cards_are_paginated(browser, tmp_path):
    """5003 cards: the page holds one page of 100 cards (not 5003 images), and the last page the rest."""
    from tagclip_cli.show import gallery_html

    (tmp_path / "thumbs").mkdir()
    (tmp_path / "overlays").mkdir()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(tmp_path / "thumbs" / "t.jpg")
    Image.new("RGB", (360, 300), (10, 200, 30)).save(tmp_path / "overlays" / "o.png")
    cards = [{"id": f"img{i:05d}.jpg", "o": "overlays/o.png", "t": "thumbs/t.jpg", "tw": 32, "th": 24,
              "size": "32x24", "tags": [[i % 3, 0.5]], "masks": [], "err": None} for i in range(5003)]
    (tmp_path / "index.html").write_text(gallery_html("big", ["a", "b", "c"], cards, 100, {}), encoding="utf-8")
    page = Page(browser)
    page.open((tmp_path / "index.html").as_uri())
    assert page.evaluate("document.querySelector('.page-label').textContent") == "page 1 of 51"
    assert page.evaluate("document.querySelectorAll('img').length") == 100
    # the page buttons as the browser renders them: arrows (gallery.js once escaped them twice, and the
    # buttons read a literal backslash-u2190)
    for pager in ("#pager-top", "#pager-bottom"):
        buttons = page.evaluate(f"Array.from(document.querySelectorAll('{pager} button')).map(b => b.innerText)")
        assert buttons == ["\u2190 prev", "next \u2192"], (pager, buttons)
    page.open((tmp_path / "index.html").as_uri() + "#page=51")
    assert [c["id"] for c in page.evaluate(CARDS)] == ["img05000.jpg", "img05001.jpg", "img05002.jpg"]
    page.open((tmp_path / "index.html").as_uri() + "#class=c&page=17")  # 1667 images of class c
    assert page.evaluate("document.querySelector('.page-label').textContent") == "page 17 of 17"
    assert [c["id"] for c in page.evaluate(CARDS)] == [f"img{i:05d}.jpg" for i in range(4802, 5003, 3)]
    assert len(page.evaluate(LOAD_ALL_IMAGES)) == 67
    assert not page.problems(), page.problems()
    page.close()


def test_doubt_order_renders_failed_first_with_each_cards_closest_decision(browser, gallery, tmp_path):
    """`show --sort doubt --failed-first`: every row's scores are 0.1, 0.3, 0.5, 0.7, normalised 0,
    1/3, 2/3, 1, so with threshold 0.5 the closest decision is 'person' or 'cup' (1/6 each; in
    float32 person's is the smaller) in every row: equal margins keep the file order, after the
    failed image."""
    root = gallery["out"].parent
    out = tmp_path / "doubt"
    done = run_show("--images", str(gallery["images"]), "--tags", str(root / "labels.parquet"), "--out", str(out),
                    "--sort", "doubt", "--failed-first", "--workers", "0")
    assert done.returncode == 0, done.stderr
    page = Page(browser)
    page.open(out.joinpath("index.html").as_uri())
    ids = [c["id"] for c in page.evaluate(CARDS)]
    assert ids == ["corrupt.jpg"] + [r["image_id"] for r in gallery["rows"] if r["status"] == "ok"][:9]
    notes = page.evaluate("Array.from(document.querySelectorAll('#cards .card')).map("
                          "c => (c.querySelector('.doubt') || {}).textContent || null)")
    assert notes[0] is None  # the failed image has no scores
    assert set(notes[1:]) == {"closest decision: person, 0.167 from its threshold 0.50"}
    assert not page.problems(), page.problems()
    page.close()
