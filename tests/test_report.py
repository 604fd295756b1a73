"""`python -m janus_batch.report`: run folders written by the real writer (every output format, local and on the
S3 server), the pages parsed, and the report opened in a real headless browser (Debian's chromium, driven over
the Chrome DevTools Protocol)."""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import websockets.sync.client
from PIL import Image

from janus_batch import report
from janus_batch.io.commits import RunFiles, index_rows, write_file
from janus_batch.io.schemas import ROW_HASH, SYNTHESIZE, understanding_schema
from janus_batch.io.storage import StorageConfig, fs_path
from janus_batch.io.writers import RunWriter
from tests.helpers import encoded

CURATED = SYNTHESIZE.append(pa.field("alignment", pa.float32()))
for _name, _type in [("aesthetic", pa.float32()), ("score", pa.float32()), ("rank", pa.int32())]:
    CURATED = CURATED.append(pa.field(_name, _type))
CURATED = CURATED.append(pa.field("kept", pa.bool_())).append(pa.field("caption", pa.string()))
KEEP = 2  # kept candidates a prompt
FORMATS = ["parquet", "webdataset", "files"]


def png(rng: np.random.Generator, size: int) -> bytes:
    """A noise image: many distinct colours, so a thumbnail shows on a screenshot."""
    return encoded(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


def candidates(prompts: int, per_prompt: int, *, curated: bool = True, failed: int = 2, size: int = 64) -> pa.Table:
    """Synthesis rows as a curated run writes them: per prompt, its candidates ranked by score (ties by sample
    index), the best KEEP kept and captioned; then `failed` prompts as error rows."""
    rng = np.random.default_rng(0)
    rows = []
    common = dict(model_id="tiny", weights_hash="w0", run_id="r1", created_at=datetime(2026, 1, 1, tzinfo=timezone.utc))
    for p in range(prompts + failed):
        row_hash = 2**63 + p  # unsigned, over int64
        base = dict(row_hash=row_hash, prompt_id=f"p{p:03d}", prompt=f"prompt number {p}", **common)
        if p >= prompts:
            rows.append({**base, "key": f"{row_hash:016x}", "error": f"prompt {p} is too long for the context"})
            continue
        scores = rng.random(per_prompt)
        ranks = {i: r + 1 for r, i in enumerate(sorted(range(per_prompt), key=lambda i: (-scores[i], i)))}
        for i in range(per_prompt):
            row = {**base, "key": f"{row_hash:016x}_{i:04d}", "sample_index": i, "seed": 7, "width": size}
            row |= dict(height=size, image={"bytes": png(rng, size), "path": None}, error=None)
            if curated:
                kept = ranks[i] <= KEEP
                row |= dict(alignment=scores[i], aesthetic=1 + 8 * rng.random(), score=scores[i], rank=ranks[i])
                row |= dict(kept=kept, caption=f"caption of {p}/{i}" if kept else None)
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=CURATED if curated else SYNTHESIZE)


def write_run(run_dir: str, table: pa.Table, output_format: str, storage: StorageConfig, prompts_per_task: int = 5):
    """Commit `table` into `run_dir` with the job's own writer, a few prompts a task, plus a summary.json."""
    fs = storage.filesystem(run_dir)
    run = RunFiles(fs_path(run_dir), fs, ROW_HASH, pa.uint64())
    text_column = "prompt" if "prompt" in table.column_names else "caption"
    writer = RunWriter(run, output_format, schema=table.schema, rows_per_file=1, text_column=text_column)
    hashes = table[ROW_HASH].unique().to_pylist()
    for t in range(math.ceil(len(hashes) / prompts_per_task)):
        chosen = pa.array(hashes[t * prompts_per_task : (t + 1) * prompts_per_task], pa.uint64())
        rows = table.filter(pa.compute.is_in(table[ROW_HASH], chosen)).cast(writer.schema)
        task = f"{t:032x}_{t:06}"
        aux, main = getattr(writer, output_format)(task, rows)
        run.commit_task(task, aux, main, index_rows(rows, ROW_HASH, pa.uint64()))
    summary = dict(status="succeeded", run_id="r1", kind="synthesize", rows=table.num_rows, spec={"seed": 7})
    if "kept" in table.column_names:
        kept, errors = pa.compute.sum(table["kept"]).as_py(), pa.compute.count(table["error"]).as_py()
        summary |= dict(candidates=table.num_rows - errors, kept=kept, selection="top 2 by score")
        summary |= dict(score_quantiles={"score": {"0.5": 0.5, "0.9": 0.9}})
    write_file(fs, run.path("summary.json"), json.dumps(summary).encode())
    return run


class Page(HTMLParser):
    """The images, links and kept marks of a report page."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.links, self.figures = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "figure":
            self.figures.append(attrs["class"])


def pages_of(out: Path) -> list[Page]:
    return [Page(p.read_text()) for p in sorted(out.glob("page-*.html"))]


@pytest.mark.parametrize("output_format", FORMATS)
def test_curated_run_in_every_format(tmp_path, output_format):
    table = candidates(prompts=12, per_prompt=6)
    run = write_run(str(tmp_path / "r1"), table, output_format, StorageConfig())
    # Leftovers of an unfinished task, never committed: a temporary main file, an errors file, an image.
    (tmp_path / "r1/data/0f_000099.parquet.tmp-0123").write_bytes(b"not parquet")
    (tmp_path / "r1/data/0f_000099.errors.parquet").write_bytes(b"not parquet")
    (tmp_path / "r1/images/0f_000099").mkdir(parents=True)
    (tmp_path / "r1/images/0f_000099/x.png").write_bytes(b"not png")

    made = report.write_report(run.run_dir, per_page=5, thumb_size=48)

    out = tmp_path / "r1/report"
    assert made == dict(
        index=str(out / "index.html"),
        pages=3,
        rows=12 * 6 + 2,
        errors=2,
        thumbnails=12 * 6,
        plots=["alignment.png", "aesthetic.png", "score.png", "alignment_vs_aesthetic.png"],
    )
    pages = pages_of(out)
    assert [len(p.figures) for p in pages] == [5 * 6, 5 * 6, 2 * 6]
    good = table.filter(pa.compute.is_null(table["error"]))
    thumbs = [src for p in pages for src in p.images]
    assert sorted(thumbs) == sorted(f"thumbs/{k}.jpg" for k in good["key"].to_pylist())
    for src in thumbs[:: len(thumbs) // 7]:
        with Image.open(out / src) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) == 48
    assert sum(f == "kept" for p in pages for f in p.figures) == 12 * KEEP
    first = (out / "page-0001.html").read_text()
    # Best first: prompt 0's rank-1 candidate leads its sheet, with its scores and caption.
    best = good.filter(pa.compute.and_(pa.compute.equal(good["prompt_id"], "p000"), pa.compute.equal(good["rank"], 1)))
    card = first[first.index("prompt number 0") :]
    assert card.index(best["key"][0].as_py()) < card.index("<figure", card.index("<figure") + 1)
    assert f"score {best['score'][0].as_py():.3f}" in card and "caption of 0/" in card
    # Navigation: every page links to the others, the summary and the errors.
    assert {"index.html", "page-0002.html", "page-0003.html", "errors.html"} <= set(pages[0].links)
    errors = (out / "errors.html").read_text()
    assert "prompt 12 is too long for the context" in errors and "prompt 13 is too long" in errors
    index = (out / "index.html").read_text()
    for fact in ("succeeded", "candidates", "top 2 by score", "score_quantiles", "0.9"):
        assert fact in index
    assert [src for src in Page(index).images] == [f"plots/{name}" for name in made["plots"]]
    for name in made["plots"]:
        with Image.open(out / "plots" / name) as plot:
            assert plot.size == report.PLOT_SIZE and len(plot.getcolors(1 << 16)) > 10


def test_plot_tells_kept_from_not_kept():
    series = [("not kept", report.OTHER_COLOUR, [0.1, 0.2, 0.2]), ("kept", report.KEPT_COLOUR, [0.9])]
    with Image.open(io.BytesIO(report.histogram_png("score", series))) as plot:
        colours = {colour for _, colour in plot.getcolors(1 << 16)}
    assert report.OTHER_COLOUR in colours and report.KEPT_COLOUR in colours


def test_an_unreadable_image_is_named_not_fatal(tmp_path):
    table = candidates(prompts=2, per_prompt=3, failed=0)
    images = table["image"].to_pylist()
    images[4] = {"bytes": b"not an image", "path": None}
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, table["image"].type))
    write_run(str(tmp_path / "r1"), table, "parquet", StorageConfig())

    made = report.write_report(str(tmp_path / "r1"))

    assert (made["rows"], made["thumbnails"]) == (6, 5)
    page = (tmp_path / "r1/report/page-0001.html").read_text()
    assert page.count("<figure") == 6 and page.count("image not shown: cannot identify image file") == 1


def images_of_kept_only(table: pa.Table, none_kept: set[str] = frozenset()) -> pa.Table:
    """`table` as a curated run writes it by default: an image for the kept candidates only. The prompts
    `none_kept` keep none of theirs (thresholds no candidate passed)."""
    rows = table.to_pylist()
    for row in rows:
        if row["prompt_id"] in none_kept:
            row |= dict(kept=False, caption=None)
        if not row["kept"]:
            row["image"] = None
    return pa.Table.from_pylist(rows, schema=table.schema)


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_sheet_shows_every_candidate_of_its_prompt(tmp_path, output_format):
    table = images_of_kept_only(candidates(prompts=3, per_prompt=4, failed=0), none_kept={"p002"})
    write_run(str(tmp_path / "r1"), table, output_format, StorageConfig())

    made = report.write_report(str(tmp_path / "r1"))

    assert (made["pages"], made["rows"], made["thumbnails"]) == (1, 12, 2 * KEEP)
    (page,) = pages_of(tmp_path / "r1/report")
    assert sorted(page.figures) == ["candidate"] * (12 - 2 * KEEP) + ["kept"] * (2 * KEEP)
    text = (tmp_path / "r1/report/page-0001.html").read_text()
    for p, kept in ((0, KEEP), (1, KEEP), (2, 0)):
        sheet = text[text.index(f"prompt number {p}<") :].split("</section>")[0]
        assert f"4 candidates &middot; {kept} kept" in sheet and sheet.count("<figure") == 4
        assert sheet.count("no image written") == 4 - kept and sheet.count("#4") == 1  # ranks shown, thumb or not
    index = (tmp_path / "r1/report/index.html").read_text()
    assert f"3 prompts, 12 candidates, {2 * KEEP} images" in index


def test_a_run_that_kept_nothing_still_has_its_sheets(tmp_path):
    table = images_of_kept_only(candidates(prompts=2, per_prompt=3, failed=0), none_kept={"p000", "p001"})
    write_run(str(tmp_path / "r1"), table, "parquet", StorageConfig())

    made = report.write_report(str(tmp_path / "r1"))

    assert (made["pages"], made["thumbnails"]) == (1, 0)
    (page,) = pages_of(tmp_path / "r1/report")
    assert page.figures == ["candidate"] * 6 and page.images == []


def test_the_index_shows_the_duplicate_counts_and_a_bad_summary_is_named(tmp_path, capsys):
    run = write_run(str(tmp_path / "r1"), candidates(prompts=1, per_prompt=2, failed=0), "parquet", StorageConfig())
    summary = json.loads((tmp_path / "r1/summary.json").read_text()) | dict(duplicates_exact=3, duplicates_normalised=5)
    (tmp_path / "r1/summary.json").write_text(json.dumps(summary))
    report.write_report(run.run_dir)
    index = (tmp_path / "r1/report/index.html").read_text()
    assert "<th>duplicates_exact</th><td>3</td>" in index and "<th>duplicates_normalised</th><td>5</td>" in index

    (tmp_path / "r1/summary.json").write_text('{"status": "succ')
    assert report.main([run.run_dir]) == 1
    assert f"{tmp_path}/r1/summary.json is not JSON" in capsys.readouterr().err


def test_plain_synthesis_run_has_sheets_and_no_plots(tmp_path):
    table = candidates(prompts=3, per_prompt=4, curated=False, failed=0)
    write_run(str(tmp_path / "r1"), table, "parquet", StorageConfig())

    made = report.write_report(str(tmp_path / "r1"), str(tmp_path / "out"))

    assert (made["pages"], made["thumbnails"], made["errors"], made["plots"]) == (1, 12, 0, [])
    (page,) = pages_of(tmp_path / "out")
    assert page.figures == ["candidate"] * 12 and "errors.html" not in page.links
    assert "prompt number 2" in (tmp_path / "out/page-0001.html").read_text()
    assert not (tmp_path / "out/errors.html").exists()


def test_a_report_rewritten_into_its_folder_drops_the_pages_it_no_longer_has(tmp_path):
    write_run(str(tmp_path / "r1"), candidates(prompts=6, per_prompt=2, failed=1), "parquet", StorageConfig())
    report.write_report(str(tmp_path / "r1"), str(tmp_path / "out"), per_page=2)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.html")) == [
        "errors.html",
        "index.html",
        "page-0001.html",
        "page-0002.html",
        "page-0003.html",
    ]
    (tmp_path / "out/notes.html").write_text("mine")  # not a page of the report: left alone

    write_run(str(tmp_path / "r2"), candidates(prompts=3, per_prompt=2, failed=0), "parquet", StorageConfig())
    made = report.write_report(str(tmp_path / "r2"), str(tmp_path / "out"), per_page=2)

    assert (made["pages"], made["errors"]) == (2, 0)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.html"))
    assert names == ["index.html", "notes.html", "page-0001.html", "page-0002.html"]


def test_caption_run_is_a_table(tmp_path):
    schema = understanding_schema(ROW_HASH, [("image_id", pa.string())], "caption")
    rows = [
        dict(key=f"{h:016x}", row_hash=h, image_id=f"img-{h}", caption=f"a cat number {h}", num_tokens=5, error=None)
        for h in range(7)
    ] + [dict(key="ff", row_hash=99, image_id="img-99", error="not an image: truncated file")]
    write_run(str(tmp_path / "r1"), pa.Table.from_pylist(rows, schema=schema), "webdataset", StorageConfig())

    made = report.write_report(str(tmp_path / "r1"), per_page=4)

    assert (made["pages"], made["rows"], made["errors"], made["thumbnails"]) == (2, 8, 1, 0)
    page = (tmp_path / "r1/report/page-0002.html").read_text()
    assert page.count("<tr>") == 1 + 3 and "a cat number 6" in page and "weights_hash" not in page
    assert "not an image: truncated file" in (tmp_path / "r1/report/errors.html").read_text()


def test_cli_on_s3(s3_server, monkeypatch, capsys):
    bucket = s3_server.make_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    storage = StorageConfig(endpoint_url=s3_server.endpoint_url, region=s3_server.region)
    write_run(f"{bucket}/out/r1", candidates(prompts=4, per_prompt=3), "webdataset", storage, prompts_per_task=2)
    argv = [f"{bucket}/out/r1", "--per-page", "3", "--s3-endpoint", s3_server.endpoint_url]

    assert report.main([*argv, "--s3-region", s3_server.region]) == 0

    assert f"12 thumbnails, 2 pages -> {bucket}/out/r1/report/index.html" in capsys.readouterr().out
    fs = pafs.S3FileSystem(**s3_server.pyarrow_options)
    selector = pafs.FileSelector(f"{bucket.removeprefix('s3://')}/out/r1/report", recursive=True)
    names = sorted(i.path.rsplit("/report/", 1)[1] for i in fs.get_file_info(selector) if i.type.name == "File")
    assert [n for n in names if not n.startswith("thumbs/")] == [
        "errors.html",
        "index.html",
        "page-0001.html",
        "page-0002.html",
        "plots/aesthetic.png",
        "plots/alignment.png",
        "plots/alignment_vs_aesthetic.png",
        "plots/score.png",
    ]
    assert len([n for n in names if n.startswith("thumbs/")]) == 12


def test_cli_refuses_what_is_not_a_run(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    assert "has no summary.json and no data files: not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--per-page", "0"])


# ---- in a real browser -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Browser]:
    """Headless chromium on a fresh profile, its DevTools port read from the profile's DevToolsActivePort."""
    executable = shutil.which("chromium")
    assert executable, "chromium not found: scripts/setup.sh installs it (apt-get install chromium)"
    # Shared memory in /tmp, not /dev/shm, as usual for headless chromium in containers (Ray keeps its object stores
    # in /dev/shm too). Its output is kept, to say why if it does not start.
    command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command += ["--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,900"]
    command += ["--hide-scrollbars", "about:blank"]
    log = profile.parent / "chromium.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {process.returncode}" if process.poll() is not None else "not up after 60 s"
                raise AssertionError(f"chromium did not start ({state}): {log.read_text()[-2000:]}")
            time.sleep(0.05)
        port, path = port_file.read_text().split()
        with websockets.sync.client.connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as socket:
            yield Browser(socket)
    finally:
        process.terminate()
        process.wait(timeout=10)


class Browser:
    """One page of a browser, driven over the Chrome DevTools Protocol (a flattened session)."""

    def __init__(self, socket):
        self.socket, self.ids, self.events, self.session = socket, itertools.count(1), [], None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")

    def call(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        message = {"id": message_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv(timeout=20))
            if reply.get("id") == message_id:
                assert "error" not in reply, reply["error"]
                return reply["result"]
            self.events.append(reply.get("method"))

    def wait_for(self, event: str) -> None:
        while event not in self.events:
            self.events.append(json.loads(self.socket.recv(timeout=20)).get("method"))
        self.events.clear()

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")  # none for undefined

    def images(self) -> list[dict]:
        """Every <img> once decoded (or failed): its src and natural width (0: it did not decode)."""
        return self.evaluate(
            "Promise.all([...document.images].map(i => i.decode().catch(() => null)))"
            ".then(() => [...document.images].map(i => ({src: i.getAttribute('src'), width: i.naturalWidth})))"
        )

    def screenshot_colours(self) -> int:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        with Image.open(io.BytesIO(data)) as shot:
            colours = shot.convert("RGB").getcolors(1 << 20)
        return len(colours)


def test_report_in_a_browser(tmp_path):
    table = candidates(prompts=40, per_prompt=8)  # 320 candidates, 2 error rows
    write_run(str(tmp_path / "r1"), table, "parquet", StorageConfig(), prompts_per_task=8)
    made = report.write_report(str(tmp_path / "r1"), per_page=15)
    assert made["pages"] == 3
    out = (tmp_path / "r1/report").as_uri()
    with chromium(tmp_path / "profile") as browser:
        browser.open(f"{out}/index.html")
        plots = browser.images()
        assert [p["src"] for p in plots] == [f"plots/{name}" for name in made["plots"]]
        assert all(p["width"] == report.PLOT_SIZE[0] for p in plots)
        links = browser.evaluate("[...document.querySelectorAll('main a')].map(a => a.getAttribute('href'))")
        assert links == ["page-0001.html", "page-0002.html", "page-0003.html"]
        assert browser.screenshot_colours() > 64

        seen = 0
        for number, prompts in [(1, 15), (2, 15), (3, 10)]:
            browser.open(f"{out}/page-{number:04d}.html")
            images = browser.images()
            assert len(images) == prompts * 8
            broken = [i["src"] for i in images if i["width"] == 0]
            assert not broken, f"page {number}: {len(broken)} images did not decode, e.g. {broken[:3]}"
            assert browser.evaluate("document.querySelectorAll('figure.kept').length") == prompts * KEEP
            assert browser.screenshot_colours() > 1000  # noise thumbnails, not a blank page
            seen += len(images)
        assert seen == made["thumbnails"]

        browser.open(f"{out}/page-0001.html")  # the links work: next, then a numbered link, then the errors
        browser.evaluate("document.querySelector('a[rel=next]').click()")
        browser.wait_for("Page.loadEventFired")
        assert browser.evaluate("location.pathname").endswith("/page-0002.html")
        browser.evaluate("document.querySelector('nav a[href=\"page-0003.html\"]').click()")
        browser.wait_for("Page.loadEventFired")
        assert browser.evaluate("document.title") == "page 3 of 3"
        browser.evaluate("document.querySelector('nav a[href=\"errors.html\"]').click()")
        browser.wait_for("Page.loadEventFired")
        assert browser.evaluate("document.querySelectorAll('main tr').length") == 1 + 2
