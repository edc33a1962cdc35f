"""What every report shares: the file names, ReportFiles and the writer that collects
them, JSON without NaN, the self-contained HTML page and its building blocks (text is
escaped by the caller), and the check that a real headless browser renders a page with
all its images (render_check)."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from breakhis import storage

REPORT_HTML = "report.html"
METRICS_JSON = "metrics.json"
CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium, used by render_check()."""


TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("image_recognition_rate", "image-level recognition rate"),
    ("patient_recognition_rate", "patient-level recognition rate"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("precision", "precision (malignant)"),
    ("recall", "recall (malignant)"),
    ("f1", "F1 (malignant)"),
    ("roc_auc", "ROC-AUC"),
)
"""The metrics of the reports' tables and their labels, in order."""


@dataclass(frozen=True)
class ReportFiles:
    """What write_report() or write_protocol_report() wrote."""

    out: str
    html: str
    """URI of report.html."""
    metrics_json: str
    """URI of metrics.json."""
    files: tuple[str, ...]
    """Every file written, report.html and metrics.json included."""


@dataclass
class ReportWriter:
    """Writes a report's files into ``out`` (local or s3://, created here) and remembers
    them, by name relative to ``out``."""

    out: str
    written: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        storage.make_dirs(self.out)

    def put(self, name: str, data: bytes) -> str:
        """Write ``data`` as ``out/name``; returns its URI."""
        uri = storage.join(self.out, name)
        storage.write_bytes(uri, data)
        self.written[name] = uri
        return uri

    def files(self, html_uri: str, metrics_uri: str) -> ReportFiles:
        return ReportFiles(
            out=self.out,
            html=html_uri,
            metrics_json=metrics_uri,
            files=tuple(self.written.values()),
        )


def json_ready(value: Any) -> Any:
    """``value`` with NaN/inf as None, numpy scalars and arrays as Python values,
    tuples as lists and keys as strings, so json.dumps(allow_nan=False) accepts it."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_bytes(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(json_ready(payload), indent=2, allow_nan=False, sort_keys=False).encode()


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def img(png: bytes, alt: str, css: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; cells are HTML already (escape text before)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def facts(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of labelled facts; values are HTML already."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="facts"><tbody>{body}</tbody></table>'


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1150px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.92em}.ok{color:#116611;font-weight:600}
.plot{max-width:100%;height:auto;display:block;margin:.5em 0}
.wrong{display:inline-block;margin:.4em;vertical-align:top;font-size:.8em;max-width:340px}
.wrong img{display:block}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}
.facts th{text-align:left;white-space:nowrap;vertical-align:top}.facts td{text-align:left}
"""

# The page marks itself once every image has decoded, so a headless browser (and a test)
# can tell a page whose images load from one that merely parses.
_IMAGES_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var images = document.images, loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-loaded", String(loaded));
});
</script>
"""


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body>\n{body}\n{_IMAGES_SCRIPT}</body></html>\n"
    )


def pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}"


# --------------------------------------------------------------------------- browser check


@dataclass(frozen=True)
class RenderCheck:
    """What a headless browser saw of a report page."""

    title: str
    images: int
    """<img> elements in the rendered page."""
    loaded: int
    """Images that decoded (naturalWidth > 0)."""

    @property
    def ok(self) -> bool:
        return self.images > 0 and self.loaded == self.images


def render_check(path: str, *, chromium: str = CHROMIUM, timeout_s: float = 120.0) -> RenderCheck:
    """Open the local report page ``path`` in headless chromium and count its loaded images.

    Returns a RenderCheck. Raises FileNotFoundError when ``chromium`` or the page
    is missing, and RuntimeError when the browser fails or the page never ran
    its image check (it did not render).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such report page")
    if shutil.which(chromium) is None:
        raise FileNotFoundError(
            f"{chromium}: no chromium to render the report (Debian: apt-get install chromium)"
        )
    profile = tempfile.mkdtemp(prefix="breakhis-chromium-")
    try:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            "file://" + os.path.abspath(path),
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    dom = done.stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    if done.returncode != 0 or total is None or loaded is None:
        raise RuntimeError(
            f"chromium did not render {path} (exit {done.returncode}): "
            f"{(done.stderr or dom)[-800:]}"
        )
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    return RenderCheck(
        title=html.unescape(title.group(1)) if title else "",
        images=int(total.group(1)),
        loaded=int(loaded.group(1)),
    )
