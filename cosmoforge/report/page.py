"""The run page as one HTML document: styles, scripts and data inline, nothing fetched.

The same document is what the dispatcher serves for a live run and what `cosmo report` writes
to a file, so a report opens offline, from a laptop or an e-mail attachment, years later. The
charting library (uPlot, MIT licence, its licence beside it in `assets/`) ships in the package.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources
from typing import Any

# Nothing but what is inline: the page can make no request, even if a document's text tried.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


@cache
def asset(name: str) -> str:
    return resources.files("cosmoforge.report").joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    # Inside <script>, only "</" can end the element early; escaping it keeps any text as data.
    return json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")


def render_page(data: dict[str, Any], refresh_seconds: int | None = None) -> str:
    """The page for `data` (from `report.data.collect`); `refresh_seconds` reloads a live page."""
    title = html.escape(f"cosmoforge run {data['run']}")
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">' if refresh_seconds else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
{refresh}
<title>{title}</title>
<style>{asset("uPlot.min.css")}</style>
<style>{asset("report.css")}</style>
</head>
<body>
<noscript>This page draws its tables and charts with JavaScript.</noscript>
<script id="run-data" type="application/json">{_script_json(data)}</script>
<script>{asset("uPlot.iife.min.js")}</script>
<script>{asset("report.js")}</script>
</body>
</html>
"""
