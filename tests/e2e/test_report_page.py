"""The run page in a real headless browser (Debian's chromium driven by Playwright).

The run folder is made by the real stages (prompts from the shipped seeds, compaction, dedup,
document statistics); only the completions' text is written here instead of by a model, which
the page does not care about. The page must load with no console error and no network request,
show the run's own numbers, and filter its sample browser as asked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_run, write_spec
from cosmoforge.cli.main import main
from cosmoforge.generation.compact import compact_dataset
from cosmoforge.postprocess import dedup
from cosmoforge.postprocess.stages import dedup_dataset
from cosmoforge.postprocess.stats import document_stats
from cosmoforge.prompts.builder import build_prompts
from cosmoforge.prompts.manifest import write_prompts
from cosmoforge.runs.status import RunStatus
from cosmoforge.services.runpages import RunPages, serving
from cosmoforge.spec import records
from cosmoforge.spec.model import dump_run
from cosmoforge.spec.validation import load_file
from cosmoforge.storage import RunStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (CI installs it)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

FAILED_EVERY = 7  # every seventh prompt fails, with one of two kinds
SAMPLING = json.dumps({"max_new_tokens": 64})


def make_run(output: Path) -> RunStore:
    document = small_run("paged")
    document["spec"]["seeds"].append(
        {"name": "questions", "kind": "instruction", "uri": "cosmoforge://samples/instructions.jsonl"}
    )
    run = load_file(str(write_spec(output.parent / "paged.yaml", document)))
    store = RunStore.open(str(output), run.name)
    store.write_text("spec.yaml", dump_run(run))
    write_prompts(store, build_prompts(run))
    prompts = next(store.read_tables("prompts")).to_pylist()
    start = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    done, failed = [], []
    for index, prompt in enumerate(prompts):
        finished = start + timedelta(seconds=30 * index)
        if index % FAILED_EVERY == 3:
            kind = "timeout" if index % 2 else "context_length"
            failed.append(prompt | {"error_kind": kind, "error": f"{kind} on try 5", "attempts": 5,
                                    "failed_at": finished, "worker": "w0"})  # fmt: skip
            continue
        text = f"Document {index} for the {prompt['audience']} in {prompt['style']} style. " * (3 + index % 5)
        done.append(prompt | {
            "text": text, "model": "test-model", "engine": "tgi", "sampling": SAMPLING,
            "prompt_tokens": 100 + index, "completion_tokens": 20 + index, "finish_reason": "length",
            "started_at": finished - timedelta(seconds=20), "finished_at": finished, "worker": "w0",
            "attempt": 1,
        })  # fmt: skip
    store.write_table("generations/w0-0.parquet", pa.Table.from_pylist(done, schema=records.GENERATIONS))
    store.write_table("failures/w0-0.parquet", pa.Table.from_pylist(failed, schema=records.FAILURES))
    compact_dataset(store, run.name, dump_run(run), [p["prompt_id"] for p in prompts])
    dedup_dataset(store.url("dataset"), store.url("dedup"), dedup.DedupConfig())
    table = pq.read_table(store.path("dataset", "data-00000-of-00001.parquet"))
    store.write_text("metrics/stats.json", json.dumps(document_stats(table)))
    return store


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunStore, Path]:
    folder = tmp_path_factory.mktemp("report")
    store = make_run(folder / "runs")
    page = folder / "report.html"
    assert main(["report", store.uri, "--out", str(page), "--gpu-hour-price", "4"]) == 0
    return store, page


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


def open_page(browser: Any, url: str) -> tuple[Any, list[str], list[str]]:
    page = browser.new_page(viewport={"width": 1300, "height": 1800})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return page, errors, requests


def card(page: Any, name: str) -> str:
    return page.locator(f"#card-{name} [data-value]").inner_text()


def test_the_report_shows_the_runs_own_numbers(report: tuple[RunStore, Path], browser: Any) -> None:
    store, path = report
    page, errors, requests = open_page(browser, path.as_uri())
    dataset = pq.read_table(store.path("dataset", "data-00000-of-00001.parquet"))
    failed = pq.read_table(store.path("failed.parquet"))
    manifest = sum(t.num_rows for t in store.read_tables("prompts"))
    assert errors == []
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []
    assert card(page, "prompts") == f"{manifest:,}"
    assert card(page, "generated") == f"{dataset.num_rows:,}"
    assert card(page, "failed") == f"{failed.num_rows:,}"
    assert card(page, "remaining") == "0"
    tokens = sum(dataset.column("completion_tokens").to_pylist())
    assert card(page, "tokens") == f"{tokens:,}"
    for audience, count in Counter(dataset.column("audience").to_pylist()).items():
        row = page.locator(f"#dist-audience tr[data-name='{audience}'] td.num")
        assert row.inner_text() == f"{count:,}"
    kinds = Counter(failed.column("error_kind").to_pylist())
    for kind, count in kinds.items():
        assert page.locator(f"#failures tr[data-kind='{kind}'] td.num").inner_text() == str(count)
    counts = json.loads(store.read_text("dedup/counts.json") or "{}")
    assert str(counts["kept"]) in page.locator("#dedup-table").inner_text()
    # 30 s between completions: the elapsed time and so the cost follow from the timestamps.
    assert page.locator("#chart canvas").count() == 1
    page.close()


def test_filtering_the_sample_browser_by_audience(report: tuple[RunStore, Path], browser: Any) -> None:
    store, path = report
    page, errors, _ = open_page(browser, path.as_uri())
    dataset = pq.read_table(store.path("dataset", "data-00000-of-00001.parquet"))
    audiences = Counter(dataset.column("audience").to_pylist())
    audience, expected = audiences.most_common(1)[0]
    page.select_option("#filter-audience", audience)
    rows = page.locator("#sample-list > div")
    assert rows.count() == expected < dataset.num_rows
    assert set(rows.evaluate_all("rows => rows.map(r => r.dataset.audience)")) == {audience}
    # Full-text search narrows further; a click shows the prompt beside its document.
    by_id = {row["prompt_id"]: row for row in dataset.to_pylist()}
    first = next(row for row in by_id.values() if row["audience"] == audience)
    words = first["text"].split(" for ")[0]  # "Document <index>", unique with what follows
    page.fill("#search", f"  {words.upper()} FOR ")  # case and the spaces around are ignored
    shown = rows.evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert shown == [first["prompt_id"]]
    rows.first.click()
    assert page.locator("#sample-prompt").inner_text() == by_id[shown[0]]["prompt"].strip()
    assert page.locator("#sample-text").inner_text().startswith(by_id[shown[0]]["text"][:40])
    assert errors == []
    page.close()


def test_the_served_page_of_a_live_run(report: tuple[RunStore, Path], browser: Any) -> None:
    """The dispatcher's page: the manager's live counts over storage's, reloading until it ends."""
    store, _ = report
    status = RunStatus(
        run="paged", phase="generating", prompts=500, generated=123, failed=2, output_uri=store.uri
    )

    async def serve_and_load() -> tuple[int, str]:
        async with serving(RunPages(lambda: [status]), "127.0.0.1", 0) as port, httpx.AsyncClient() as client:
            missing = await client.get(f"http://127.0.0.1:{port}/runs/other")
            assert missing.status_code == 404
            index = await client.get(f"http://127.0.0.1:{port}/")
            assert "/runs/paged" in index.text
            page = await client.get(f"http://127.0.0.1:{port}/runs/paged")
            assert page.headers["content-security-policy"].startswith("default-src 'none'")
            return port, page.text

    # Playwright's sync API owns this thread's event loop: the server gets a thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        _, text = pool.submit(asyncio.run, serve_and_load()).result(timeout=120)
    assert 'http-equiv="refresh"' in text  # a live page reloads itself
    saved = report[1].with_name("live.html")
    saved.write_text(text)
    page, errors, requests = open_page(browser, saved.as_uri())
    assert errors == [] and all(url.startswith(("file:", "data:")) for url in requests)
    assert card(page, "generated") == "123"
    assert card(page, "remaining") == "375"
    assert page.locator("#state").inner_text() == "(generating)"
    page.close()
