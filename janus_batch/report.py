"""A static HTML report of a run folder: `python -m janus_batch.report RUN_DIR [--out DIR]` (local or s3://).

It reads the run's committed data only: the main files under `data/` (`*.parquet`, `*.tar`) and, beside a
WebDataset shard, its `*.errors.parquet`; temporary files and the leftovers of unfinished tasks are never read.
Files are read one at a time and a batch of rows at a time, each image shrunk to a thumbnail as it is read, so
only the rows' other columns stay in memory, whatever the size of the run. It writes, under OUT (default
RUN_DIR/report, with the storage layer, so it may be s3:// too):

    index.html            the run summary (summary.json), the score plots, the list of pages
    page-0001.html ...    contact sheets of --per-page prompts each: every candidate with its scores, rank, kept
                          mark and caption, where the run has those columns, and its thumbnail where the run wrote
                          its image; a run of text rows (captions, answers): a table of its rows
    errors.html           the error rows (when there are any)
    plots/*.png           histograms of alignment, aesthetic and score, the alignment-vs-aesthetic scatter (kept
                          vs not kept), drawn with PIL
    thumbs/KEY.jpg        the thumbnails (JPEG, at most --thumb-size pixels a side)

Links are relative, the CSS inline, there is no script: the folder opens offline, in any browser.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import posixpath
import sys
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError

from janus_batch.io.commits import DATA, ERRORS_SUFFIX, is_main, read_file, write_file
from janus_batch.io.schemas import ERROR
from janus_batch.io.storage import StorageConfig, fs_path, join, one_line, read_bytes

DEFAULT_PER_PAGE = 50  # prompts a page: 10,000 candidates at 16 a prompt make 13 pages
DEFAULT_THUMB_SIZE = 128
BATCH_ROWS = 64  # rows read (and images held) at once
THREADS = 8  # thumbnails made and written side by side (store latency, PIL releases the GIL)
SUMMARY_MAX_BYTES = 16 << 20
SCORES = ("alignment", "aesthetic", "score")
HIDDEN = {"model_id", "weights_hash", "run_id", "created_at", "row_hash", ERROR}  # bookkeeping, not shown in tables
RUN_FACTS = ("status", "run_id", "kind", "inputs", "inputs_done", "rows", "errors", "expected_rows", "wall_time_s")
RUN_FACTS += ("rows_per_s", "started_at", "finished_at", "repaired_before")
CURATION_FACTS = ("candidates", "kept", "duplicates_exact", "duplicates_normalised", "selection", "score_quantiles")
IMAGE_MEMBERS = (".png", ".jpg", ".jpeg", ".webp")
KEPT_COLOUR, OTHER_COLOUR = (34, 139, 34), (150, 150, 170)


@dataclass
class ReportRow:
    columns: dict[str, Any]  # the row's columns but its image
    thumb: str | None = None  # thumbs/KEY.jpg, relative to the report
    thumb_size: tuple[int, int] = (0, 0)
    unreadable: str | None = None  # why its image cannot be shown

    @property
    def has_image(self) -> bool:
        return self.thumb is not None or self.unreadable is not None


@dataclass(frozen=True)
class Place:
    """A folder on a store: its pyarrow filesystem and path."""

    fs: pafs.FileSystem
    path: str

    @classmethod
    def of(cls, uri: str, storage: StorageConfig) -> Place:
        return cls(storage.filesystem(uri), fs_path(uri).rstrip("/"))

    def join(self, relative: str) -> str:
        return posixpath.join(self.path, relative)


# ---- reading the run ----------------------------------------------------------------------------------------

# A row's columns and its image: encoded bytes, the pyarrow path of its file ('files' format), or None.
Item = tuple[dict[str, Any], bytes | str | None]


def committed_files(run: Place) -> list[str]:
    """The run's committed data files, relative to it, in name order: main files, each shard's errors file
    after its main file."""
    selector = pafs.FileSelector(run.join(DATA), allow_not_found=True)
    names = {
        f"{DATA}/{posixpath.basename(i.path)}" for i in run.fs.get_file_info(selector) if i.type == pafs.FileType.File
    }
    files = []
    for main in sorted(n for n in names if is_main(n)):
        files.append(main)
        errors = main.removesuffix(".tar") + ERRORS_SUFFIX
        if main.endswith(".tar") and errors in names:
            files.append(errors)
    return files


def parquet_items(run: Place, relative: str) -> Iterator[Item]:
    with run.fs.open_input_file(run.join(relative)) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                image = row.pop("image", None)
                file_name = row.get("file_name")
                if image is not None:
                    yield row, image["bytes"]
                elif file_name is not None:  # 'files': the image is a file of the run
                    yield row, run.join(file_name)
                else:
                    yield row, None


def tar_items(run: Place, relative: str) -> Iterator[Item]:
    """A WebDataset shard's samples, streamed: `{key}.{png,jpg,webp}`, `{key}.txt`, then `{key}.json` (the row)."""
    images: dict[str, bytes] = {}
    with run.fs.open_input_stream(run.join(relative)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if member.name.endswith(IMAGE_MEMBERS):
                images[key] = tar.extractfile(member).read()
            elif ext == "json":
                yield json.loads(tar.extractfile(member).read()), images.pop(key, None)


def batched(items: Iterator[Item]) -> Iterator[list[Item]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def thumbnail(data: bytes, size: int) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of the image shrunk to at most `size` pixels a side (never enlarged), and its size."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # a JPEG decodes at a reduced scale
        small = image.convert("RGB")
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return buffer.getvalue(), small.size


def read_rows(run: Place, out: Place, thumb_size: int) -> list[ReportRow]:
    """Every committed row of the run, its image written as a thumbnail under `out`."""

    def report_row(item: Item) -> ReportRow:
        columns, image = item
        if image is None:
            return ReportRow(columns)
        try:
            data, size = thumbnail(image if isinstance(image, bytes) else read_file(run.fs, image), thumb_size)
        except OSError as e:  # not an image (PIL's UnidentifiedImageError), truncated, or its file is gone
            return ReportRow(columns, unreadable=one_line(e))
        name = f"thumbs/{columns['key']}.jpg"
        write_file(out.fs, out.join(name), data)
        return ReportRow(columns, thumb=name, thumb_size=size)

    rows: list[ReportRow] = []
    with ThreadPoolExecutor(THREADS) as pool:
        for relative in committed_files(run):
            items = tar_items(run, relative) if relative.endswith(".tar") else parquet_items(run, relative)
            for batch in batched(items):
                rows += pool.map(report_row, batch)
    return rows


def read_summary(run_dir: str, storage: StorageConfig) -> dict | None:
    uri = join(run_dir, "summary.json")
    try:
        summary = json.loads(read_bytes(uri, storage, SUMMARY_MAX_BYTES))
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise ValueError(f"{uri} is not UTF-8 JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri} is not JSON: {e}") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{uri} is not a JSON object")
    return summary


# ---- plots --------------------------------------------------------------------------------------------------

PLOT_SIZE = (480, 320)
MARGIN = (56, 34, 16, 40)  # left, top, right, bottom


class Axes:
    """A PIL canvas with a framed plot area mapping data (x, y) ranges to pixels."""

    def __init__(self, title: str, x_range: tuple[float, float], y_range: tuple[float, float], x_label: str):
        self.image = Image.new("RGB", PLOT_SIZE, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default(13)
        left, top, right, bottom = MARGIN
        self.box = (left, top, PLOT_SIZE[0] - right, PLOT_SIZE[1] - bottom)
        self.x_range, self.y_range = x_range, y_range
        self.draw.text((left, 8), title, fill="black", font=self.font)
        self.draw.rectangle(self.box, outline="black")
        for value in (x_range[0], (x_range[0] + x_range[1]) / 2, x_range[1]):
            x = self.x(value)
            self.draw.line([(x, self.box[3]), (x, self.box[3] + 4)], fill="black")
            self.draw.text((x, self.box[3] + 6), f"{value:.3g}", fill="black", font=self.font, anchor="ma")
        for value in (y_range[0], y_range[1]):
            y = self.y(value)
            self.draw.text((self.box[0] - 6, y), f"{value:.3g}", fill="black", font=self.font, anchor="rm")
        middle = (self.box[0] + self.box[2]) / 2
        self.draw.text((middle, PLOT_SIZE[1] - 4), x_label, fill="black", font=self.font, anchor="md")

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.box[0] + (value - low) / (high - low) * (self.box[2] - self.box[0])

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.box[3] - (value - low) / (high - low) * (self.box[3] - self.box[1])

    def legend(self, series: list[tuple[str, tuple[int, int, int], list[float]]]) -> None:
        x = self.box[2] - 8
        for label, colour, values in reversed(series):
            text = f"{label} ({len(values)})"
            x -= self.draw.textlength(text, font=self.font)
            self.draw.text((x, 8), text, fill=colour, font=self.font)
            x -= 14

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, "PNG")
        return buffer.getvalue()


def value_range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    return (low - 0.5, high + 0.5) if low == high else (low, high)


def histogram_png(column: str, series: list[tuple[str, tuple[int, int, int], list[float]]], bins: int = 20) -> bytes:
    """Stacked histogram of `column`, one colour per series."""
    low, high = value_range([v for _, _, values in series for v in values])
    width = (high - low) / bins
    counts = [[0] * bins for _ in series]
    for s, (_, _, values) in enumerate(series):
        for v in values:
            counts[s][min(int((v - low) / width), bins - 1)] += 1
    top = max(sum(c[b] for c in counts) for b in range(bins))
    axes = Axes(f"{column}: histogram", (low, high), (0, top), column)
    for b in range(bins):
        base = 0
        for s, (_, colour, _) in enumerate(series):
            if counts[s][b]:
                left, right = axes.x(low + b * width) + 1, axes.x(low + (b + 1) * width) - 1
                axes.draw.rectangle((left, axes.y(base + counts[s][b]), right, axes.y(base)), fill=colour)
                base += counts[s][b]
    axes.legend(series)
    return axes.png()


def scatter_png(points: list[tuple[str, tuple[int, int, int], list[tuple[float, float]]]]) -> bytes:
    """Alignment (x) against aesthetic (y), a colour per series, the later series drawn over the earlier."""
    xs = [x for _, _, pts in points for x, _ in pts]
    ys = [y for _, _, pts in points for _, y in pts]
    axes = Axes("alignment vs aesthetic", value_range(xs), value_range(ys), "alignment (x), aesthetic (y)")
    for _, colour, pts in points:
        for x, y in pts:
            px, py = axes.x(x), axes.y(y)
            axes.draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
    axes.legend(points)
    return axes.png()


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def split_by_kept(scored: list[dict], value, has_kept: bool) -> list[tuple[str, tuple[int, int, int], list]]:
    """[(label, colour, values)] of `value(columns)` where it is not None: not kept, then kept (drawn over them),
    or all rows as one series in a run without a `kept` column."""
    if not has_kept:
        return [("all", OTHER_COLOUR, [v for c in scored if (v := value(c)) is not None])]
    return [
        (label, colour, [v for c in scored if (c.get("kept") is True) is want and (v := value(c)) is not None])
        for label, colour, want in (("not kept", OTHER_COLOUR, False), ("kept", KEPT_COLOUR, True))
    ]


def plots(rows: list[ReportRow]) -> dict[str, bytes]:
    """{file name: PNG} of the score plots the rows' columns allow: kept and not kept apart where `kept` exists."""
    scored = [r.columns for r in rows if r.columns.get(ERROR) is None]
    has_kept = any("kept" in c for c in scored)
    out = {}
    for column in SCORES:
        series = split_by_kept(scored, lambda c, column=column: number(c.get(column)), has_kept)
        if any(values for _, _, values in series):
            out[f"{column}.png"] = histogram_png(column, series)

    def pair(c: dict) -> tuple[float, float] | None:
        x, y = number(c.get("alignment")), number(c.get("aesthetic"))
        return None if x is None or y is None else (x, y)

    points = split_by_kept(scored, pair, has_kept)
    if any(pts for _, _, pts in points):
        out["alignment_vs_aesthetic.png"] = scatter_png(points)
    return out


# ---- HTML ---------------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def css(thumb_size: int) -> str:
    return (
        "body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f6f6}"
        "nav{padding:8px 16px;background:#fff;border-bottom:1px solid #ddd;line-height:1.9}"
        "nav a,nav strong{margin-right:8px}main{padding:8px 16px}"
        "table{border-collapse:collapse;background:#fff;margin:6px 0}"
        "td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}"
        "section{margin:0 0 20px}h2{font-size:15px;margin:12px 0 2px}.meta{color:#666;margin:0 0 6px}"
        ".sheet{display:flex;flex-wrap:wrap;gap:6px}"
        f"figure{{margin:0;padding:3px;background:#fff;border:3px solid #ddd;width:{thumb_size}px;font-size:11px}}"
        f"figure img{{display:block;max-width:{thumb_size}px}}"
        "figure.kept{border-color:#228b22}.mark{color:#fff;background:#228b22;padding:0 4px;border-radius:3px}"
        ".unreadable{color:#b00;height:64px}.noimage{color:#888;height:64px}"
        "figcaption{overflow-wrap:anywhere}.plots img{margin:4px}"
        "pre{background:#fff;padding:8px;overflow:auto}"
    )


def document(title: str, nav: str, body: str, thumb_size: int) -> bytes:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{css(thumb_size)}</style></head><body>{nav}<main>{body}</main>{nav}</body></html>\n"
    ).encode()


def page_name(number: int) -> str:
    return f"page-{number:04d}.html"


def navigation(current: int | str, pages: int, errors: int) -> str:
    """Links to the summary, every page (the current one bold), previous/next, and the errors."""
    links = ["<strong>summary</strong>" if current == "index" else '<a href="index.html">summary</a>']
    if isinstance(current, int) and current > 1:
        links.append(f'<a rel="prev" href="{page_name(current - 1)}">&lsaquo; prev</a>')
    for n in range(1, pages + 1):
        links.append(f"<strong>{n}</strong>" if n == current else f'<a href="{page_name(n)}">{n}</a>')
    if isinstance(current, int) and current < pages:
        links.append(f'<a rel="next" href="{page_name(current + 1)}">next &rsaquo;</a>')
    if errors:
        label = f"errors ({errors})"
        links.append(f"<strong>{label}</strong>" if current == "errors" else f'<a href="errors.html">{label}</a>')
    return f"<nav>{''.join(links)}</nav>"


def shown(value: Any) -> str:
    """A value as HTML: mappings as nested tables, floats to 4 significant digits."""
    if isinstance(value, dict):
        cells = "".join(f"<tr><th>{esc(k)}</th><td>{shown(v)}</td></tr>" for k, v in value.items())
        return f"<table>{cells}</table>"
    if isinstance(value, list):
        return esc(", ".join(str(v) for v in value))
    if isinstance(value, float):
        return esc(f"{value:.4g}")
    return "" if value is None else esc(value)


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{shown(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def card(row: ReportRow) -> str:
    c = row.columns
    kept = c.get("kept") is True
    if row.thumb is not None:
        width, height = row.thumb_size
        picture = f'<img src="{esc(quote(row.thumb))}" width="{width}" height="{height}" alt="{esc(c["key"])}">'
    elif row.unreadable is not None:
        picture = f'<div class="unreadable">image not shown: {esc(row.unreadable)}</div>'
    else:  # a candidate whose image the run did not write (not kept, without --write-all)
        picture = '<div class="noimage">no image written</div>'
    lines = []
    head = [f"#{c['rank']}" if c.get("rank") is not None else None, '<span class="mark">kept</span>' if kept else None]
    lines.append(" ".join(h for h in head if h))
    formats = {"score": ".3f", "alignment": ".3f", "aesthetic": ".2f"}
    scores = [f"{name} {value:{formats[name]}}" for name in SCORES if (value := number(c.get(name))) is not None]
    lines.append(" &middot; ".join(scores))
    sample = [f"sample {c['sample_index']}" if c.get("sample_index") is not None else None]
    sample.append(f"seed {c['seed']}" if c.get("seed") is not None else None)
    lines.append(" &middot; ".join(s for s in sample if s))
    if c.get("caption"):
        lines.append(f"<q>{esc(c['caption'])}</q>")
    caption = "<br>".join(line for line in lines if line)
    return f'<figure class="{"kept" if kept else "candidate"}">{picture}<figcaption>{caption}</figcaption></figure>'


def first_of(columns: dict[str, Any], names: tuple[str, ...]) -> Any:
    """The first of the columns `names` that the row has and is not null (the last, `key`, always is)."""
    return next(columns[n] for n in names if columns.get(n) is not None)


def prompt_groups(rows: list[ReportRow]) -> list[list[ReportRow]]:
    """The candidate rows by prompt (prompt_id, else prompt text, else one row a group), in order of appearance,
    each best first: by rank where there is one, then by sample index."""
    groups: dict[Any, list[ReportRow]] = {}
    for row in rows:
        groups.setdefault(first_of(row.columns, ("prompt_id", "prompt", "key")), []).append(row)

    def order(row: ReportRow) -> tuple:
        rank, sample = row.columns.get("rank"), row.columns.get("sample_index")
        return (rank is None, rank or 0, sample is None, sample or 0)

    return [sorted(group, key=order) for group in groups.values()]


def sheet(group: list[ReportRow]) -> str:
    first = group[0].columns
    title = first_of(first, ("prompt", "prompt_id", "key"))
    ident = first.get("prompt_id")
    meta = [f"prompt id {esc(ident)}" if ident is not None else None, f"{len(group)} candidates"]
    if any("kept" in r.columns for r in group):
        meta.append(f"{sum(r.columns.get('kept') is True for r in group)} kept")
    cards = "".join(card(r) for r in group)
    return (
        f'<section><h2>{esc(title)}</h2><p class="meta">{" &middot; ".join(m for m in meta if m)}</p>'
        f'<div class="sheet">{cards}</div></section>'
    )


def summary_body(summary: dict | None, rows: list[ReportRow], pages: list[str], plot_names: list[str]) -> str:
    parts = ["<h1>Run report</h1>"]
    if summary is None:
        parts.append("<p>No summary.json: the run has not finished. The pages show the rows committed so far.</p>")
    else:
        parts.append("<h2>Run</h2>" + shown({k: summary[k] for k in RUN_FACTS if k in summary}))
        curation = {k: summary[k] for k in CURATION_FACTS if k in summary}
        if curation:
            parts.append("<h2>Curation</h2>" + shown(curation))
    errors = sum(r.columns.get(ERROR) is not None for r in rows)
    found = {"rows": len(rows), "error rows": errors}
    if any("kept" in r.columns for r in rows):
        found["kept"] = sum(r.columns.get("kept") is True for r in rows)
    parts.append("<h2>In the data files</h2>" + shown(found))
    if plot_names:
        images = "".join(f'<img src="plots/{esc(name)}" alt="{esc(name)}">' for name in plot_names)
        parts.append(f'<h2>Scores</h2><div class="plots">{images}</div>')
    if pages:
        links = "".join(f'<li><a href="{page_name(n)}">page {n}</a>: {esc(d)}</li>' for n, d in enumerate(pages, 1))
        parts.append(f"<h2>Pages</h2><ul>{links}</ul>")
    if summary is not None and "spec" in summary:
        parts.append(
            f"<details><summary>spec</summary><pre>{esc(json.dumps(summary['spec'], indent=2))}</pre></details>"
        )
    return "".join(parts)


def error_table(rows: list[ReportRow]) -> str:
    names = ("key", "prompt_id", "prompt", "path", "question", "sample_index", ERROR)
    return table([{n: r.columns[n] for n in names if n in r.columns} for r in rows])


def remove_stale_pages(out: Place, written: set[str]) -> None:
    """Delete the pages an earlier report into `out` left that this one did not write (a longer run's last
    pages, its errors page), so that no page of the folder shows another run's state."""
    selector = pafs.FileSelector(out.path, allow_not_found=True)
    for info in out.fs.get_file_info(selector):
        name = posixpath.basename(info.path)
        stale = name == "errors.html" or (name.startswith("page-") and name.endswith(".html"))
        if info.type == pafs.FileType.File and stale and name not in written:
            out.fs.delete_file(info.path)


def write_report(
    run_dir: str,
    out_dir: str | None = None,
    *,
    per_page: int = DEFAULT_PER_PAGE,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    storage: StorageConfig | None = None,
) -> dict:
    """Write the report of the run in `run_dir` into `out_dir` (default RUN_DIR/report); return what it holds."""
    storage = storage or StorageConfig()
    out_dir = out_dir or join(run_dir, "report")
    run, out = Place.of(run_dir, storage), Place.of(out_dir, storage)
    summary = read_summary(run_dir, storage)
    rows = read_rows(run, out, thumb_size)
    if summary is None and not rows:
        raise FileNotFoundError(f"{run_dir} has no summary.json and no data files: not a run folder")

    errors = [r for r in rows if r.columns.get(ERROR) is not None]
    good = [r for r in rows if r.columns.get(ERROR) is None]
    # A synthesis run's rows are candidates: in a curated run, by default, only the kept ones carry an image, and
    # a prompt's sheet shows every candidate all the same (its scores, rank), and a prompt with none kept.
    candidates = [r for r in good if r.has_image or "kept" in r.columns]
    if candidates:  # contact sheets, per_page prompts a page
        groups = prompt_groups(candidates)
        chunks = [groups[i : i + per_page] for i in range(0, len(groups), per_page)]
        bodies = ["".join(sheet(g) for g in chunk) for chunk in chunks]
        described = [
            f"{len(chunk)} prompts, {sum(len(g) for g in chunk)} candidates, "
            f"{sum(r.has_image for g in chunk for r in g)} images"
            for chunk in chunks
        ]
    else:  # a text run (captions, answers): its rows in tables
        chunks = [good[i : i + per_page] for i in range(0, len(good), per_page)]
        shown_rows = [[{k: v for k, v in r.columns.items() if k not in HIDDEN} for r in chunk] for chunk in chunks]
        bodies = [table(chunk) for chunk in shown_rows]
        described = [f"{len(chunk)} rows" for chunk in chunks]

    plot_files = plots(rows)
    for name, data in plot_files.items():
        write_file(out.fs, out.join(f"plots/{name}"), data)
    pages = len(bodies)

    def write_page(name: str, title: str, current: int | str, body: str) -> None:
        nav = navigation(current, pages, len(errors))
        write_file(out.fs, out.join(name), document(title, nav, body, thumb_size))

    for n, body in enumerate(bodies, 1):
        write_page(page_name(n), f"page {n} of {pages}", n, body)
    if errors:
        write_page("errors.html", "errors", "errors", f"<h1>Error rows ({len(errors)})</h1>{error_table(errors)}")
    write_page("index.html", "run report", "index", summary_body(summary, rows, described, list(plot_files)))
    remove_stale_pages(out, {page_name(n) for n in range(1, pages + 1)} | ({"errors.html"} if errors else set()))
    return {
        "index": join(out_dir, "index.html"),
        "pages": pages,
        "rows": len(rows),
        "errors": len(errors),
        "thumbnails": sum(r.thumb is not None for r in rows),
        "plots": list(plot_files),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m janus_batch.report", description="Write a static HTML report of a janus-batch run folder."
    )
    parser.add_argument("run_dir", help="the run folder, OUTPUT/RUN_ID (local or s3://)")
    parser.add_argument("--out", help="where to write the report (default: RUN_DIR/report)")
    parser.add_argument("--per-page", type=int, default=DEFAULT_PER_PAGE, help="prompts (or text rows) a page")
    parser.add_argument("--thumb-size", type=int, default=DEFAULT_THUMB_SIZE, help="thumbnail side, in pixels")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, Ceph, ...)")
    parser.add_argument("--s3-region")
    args = parser.parse_args(argv)
    if args.per_page < 1:
        parser.error("--per-page must be at least 1")
    if not 16 <= args.thumb_size <= 1024:
        parser.error("--thumb-size must be between 16 and 1024")
    try:
        storage = StorageConfig(endpoint_url=args.s3_endpoint, region=args.s3_region)
    except ValidationError as e:
        parser.error(f"--s3-endpoint: {e.errors(include_url=False)[0]['msg']}")
    try:
        made = write_report(args.run_dir, args.out, per_page=args.per_page, thumb_size=args.thumb_size, storage=storage)
    except (OSError, ValueError) as e:
        print(f"report failed: {one_line(e)}", file=sys.stderr)
        return 1
    print(
        f"[janus-batch] report: {made['rows']} rows ({made['errors']} errors), {made['thumbnails']} thumbnails, "
        f"{made['pages']} pages -> {made['index']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
