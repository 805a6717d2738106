"""`bench_decontam.py --end-to-end`: `cosmo decontaminate` on files, as a user runs it.

Times the command in a child process (start-up included), once building the benchmark index
and once with it cached, against Cosmopedia's script on the same files (read, index, check,
write kept/removed); prints where the seconds go in the command as it was (the whole table
read, the index built each time, written after checking) and as it is (the index from the
cache, rows streamed through the checker with reading and writing overlapped); and checks that
it removes exactly the documents the recipe's definition removes (`decontam_reference`).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from decontam_reference import Reference, removed_ids

from cosmoforge.postprocess import decontam, evalsets, stages
from cosmoforge.postprocess.decontam import BenchmarkItem, Config


def write_inputs(folder: Path, docs: list[str], items: list[BenchmarkItem]) -> tuple[Path, Path]:
    corpus, benchmark = folder / "corpus.parquet", folder / "items.jsonl"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), corpus)
    rows = [{"text": item.text, "task_name": item.benchmark} for item in items]
    benchmark.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return corpus, benchmark


class _Laps:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._started = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._started
        self._started = now


def _before(corpus: Path, benchmark: Path, out: Path, workers: int) -> dict[str, float]:
    """The command's former path: the whole table read, the index built, checked, then split and
    written (with today's checker: the difference is the path, not the checking)."""
    lap = _Laps()
    table = evalsets.read_table(str(corpus))
    texts = evalsets.text_column(table, "text")
    lap("read")
    index = decontam.build_index(evalsets.load_benchmarks([str(benchmark)]), Config())
    lap("benchmarks + index")
    verdicts = list(decontam.check_all(texts, index, workers=workers))
    lap("check (streamed: + read, write)")
    kept, removed = stages.split_by_verdict(table, verdicts)
    pq.write_table(kept, out / "kept.parquet", compression="zstd")
    pq.write_table(removed, out / "removed.parquet", compression="zstd")
    lap("write kept/removed")
    report = decontam.build_report(verdicts, index, None, sum(1 for text in texts if not text.strip()))
    (out / "report.json").write_bytes(stages.report_json(report))
    (out / "report.md").write_text(decontam.report_markdown(report), encoding="utf-8")
    lap("report")
    return lap.times


def _after(corpus: Path, benchmark: Path, out: Path, workers: int) -> dict[str, float]:
    """The command now, through the functions `decontaminate_dataset` calls (the index cache warm)."""
    from fsspec.core import url_to_fs

    from cosmoforge import tables
    from cosmoforge.postprocess.decontam import cache, dataset

    lap = _Laps()
    specs = [str(benchmark)]
    index = cache.index_for(lambda: evalsets.load_benchmarks(specs), Config(), evalsets.fingerprint(specs))
    lap("benchmarks + index")
    schema, batches = tables.scan(str(corpus))
    fs, root = url_to_fs(str(out))
    outputs = dataset.Outputs(fs, root, "kept.parquet", "removed.parquet", "report.json", "report.md")
    report = dataset.decontaminate(schema, batches, ("text", None), index, outputs, workers).as_dict()
    lap("check (streamed: + read, write)")
    (out / "report.json").write_bytes(stages.report_json(report))
    (out / "report.md").write_text(decontam.report_markdown(report), encoding="utf-8")
    lap("report")
    return lap.times


def _reference_files(corpus: Path, benchmark: Path, out: Path) -> tuple[dict[str, float], int]:
    """Cosmopedia's script on the same files: read, build its dict, check, write kept/removed."""
    lap = _Laps()
    table = pq.read_table(corpus)
    texts = table.column("text").to_pylist()
    rows = [json.loads(line) for line in benchmark.open(encoding="utf-8")]
    items = [BenchmarkItem(row["task_name"], number, row["text"]) for number, row in enumerate(rows)]
    lap("read")
    reference = Reference(items, Config())
    lap("benchmarks + index")
    removed = pa.array([reference.check(text)[0] for text in texts])
    lap("check (streamed: + read, write)")
    pq.write_table(table.filter(pc.invert(removed)), out / "kept.parquet", compression="zstd")
    pq.write_table(table.filter(removed), out / "removed.parquet", compression="zstd")
    lap("write kept/removed")
    return lap.times, int(pc.sum(removed).as_py() or 0)


def _in_child(path: str, corpus: Path, benchmark: Path, out: Path, workers: int) -> dict[str, float]:
    """`_before` or `_after` in a fresh process, as the command runs: this one holds the corpus and
    the benchmarks several times over, which slows forking and collecting garbage."""
    arguments = [path, str(corpus), str(benchmark), str(out), str(workers)]
    finished = subprocess.run(
        [sys.executable, __file__, *arguments], capture_output=True, text=True, check=True
    )
    times: dict[str, float] = json.loads(finished.stdout)
    return times


def _start_up() -> float:
    """Seconds for a child to build `cosmo`'s parser and import the decontamination stage."""
    code = (
        "from cosmoforge.cli.main import build_parser; build_parser(); import cosmoforge.postprocess.stages"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def _command(corpus: Path, benchmark: Path, out: Path, workers: int, cache: Path) -> tuple[float, float, str]:
    """(wall seconds, cpu seconds of the command and its checking processes, its summary line)."""
    command = [
        sys.executable,
        "-m",
        "cosmoforge.cli",
        "decontaminate",
        str(corpus),
        "--benchmark",
        str(benchmark),
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]
    environment = {**os.environ, "COSMOFORGE_DECONTAM_INDEX_CACHE": str(cache)}
    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    finished = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, finished.stdout.strip()


def _removed_ids(folder: Path) -> list[int]:
    return sorted(pq.read_table(folder / "removed.parquet", columns=["id"]).column("id").to_pylist())


def end_to_end(docs: list[str], items: list[BenchmarkItem], workers: int, cache: Path) -> int:
    """Print the figures; 0 when cosmo removes exactly the documents the definition removes."""
    with tempfile.TemporaryDirectory(prefix="bench-decontam-") as name:
        folder = Path(name)
        corpus, benchmark = write_inputs(folder, docs, items)
        size = corpus.stat().st_size / 1e6
        print(
            f"\nend to end: {len(docs)} documents ({size:.1f} MB parquet), {len(items)} items, "
            f"{workers} workers"
        )
        definition, seconds, cached = removed_ids(corpus, benchmark, cache, workers)
        print(
            f"  the definition (every candidate verified, difflib): {len(definition)} removed, "
            f"computed in {seconds:.0f} s with {workers} processes{' (cached verdicts)' if cached else ''}"
        )
        # The machine may be shared: the runs of the command and its start-up are repeated, and
        # the median is the figure (all are printed).
        start_up = statistics.median(_start_up() for _ in range(3))
        cold, _, _ = _command(corpus, benchmark, folder / "cold", workers, folder / "index-cache")
        runs = [
            _command(corpus, benchmark, folder / "cli", workers, folder / "index-cache") for _ in range(3)
        ]
        warm, line = statistics.median(wall for wall, _, _ in runs), runs[-1][2]
        warm_cpu = statistics.median(cpu for _, cpu, _ in runs)
        print(
            f"  cosmo decontaminate (child process, start-up included): {warm:.2f} s with the benchmark "
            f"index cached (median of {', '.join(f'{wall:.2f}' for wall, _, _ in runs)}), {cold:.2f} s "
            "building it (the first run for these benchmarks)"
        )
        print(f"    {line[:200]}")
        for name in ("before", "after", "reference"):
            (folder / name).mkdir()
        before = _in_child("before", corpus, benchmark, folder / "before", workers)
        os.environ["COSMOFORGE_DECONTAM_INDEX_CACHE"] = str(folder / "index-cache")
        after = _in_child("after", corpus, benchmark, folder / "after", workers)
        script_cpu = time.process_time()
        reference, script_removed = _reference_files(corpus, benchmark, folder / "reference")
        script_cpu = time.process_time() - script_cpu
        stages_ = (
            "read",
            "benchmarks + index",
            "check (streamed: + read, write)",
            "write kept/removed",
            "report",
        )
        print("  breakdown, each in a fresh process (s): before = whole table, index built; after = streamed")
        print(f"  {'':32} {'before':>8} {'after':>8} {'Cosmopedia script':>18}")
        print(f"  {'start-up (child, no work)':32} {start_up:8.2f} {start_up:8.2f} {'-':>18}")
        for stage in stages_:
            cells = [f"{times[stage]:8.2f}" if stage in times else f"{'-':>8}" for times in (before, after)]
            theirs = f"{reference[stage]:18.2f}" if stage in reference else f"{'-':>18}"
            print(f"  {stage:32} {' '.join(cells)} {theirs}")
        total = sum(reference.values())
        print(
            f"  {'total':32} {start_up + sum(before.values()):8.2f} {start_up + sum(after.values()):8.2f} "
            f"{total:18.2f}"
        )
        print(
            f"  Cosmopedia script / cosmo decontaminate (wall): {total / warm:.1f}x with the index cached, "
            f"{total / cold:.1f}x building it"
        )
        print(
            f"  cpu seconds (less sensitive to the machine's load): Cosmopedia script {script_cpu:.1f}, "
            f"cosmo decontaminate {warm_cpu:.1f} in all its processes: {script_cpu / warm_cpu:.1f}x"
        )
        print(
            f"  the definition / cosmo decontaminate (wall): {seconds / warm:.1f}x "
            f"(the definition's time {'from its cache, taken at another load' if cached else 'just now'})"
        )
        ours, first = _removed_ids(folder / "cli"), _removed_ids(folder / "cold")
        same = ours == first == sorted(definition)
        print(
            f"  removed: cosmo {len(ours)}, the definition {len(definition)}: "
            f"{'the same documents' if same else 'DIFFERENT documents'}; Cosmopedia script {script_removed}"
        )
        if not same:
            print(
                f"    only cosmo: {sorted(set(ours) - set(definition))[:20]}, "
                f"only the definition: {sorted(set(definition) - set(ours))[:20]}"
            )
        print(f"  load average at the end: {os.getloadavg()[0]:.1f}")
        return 0 if same else 1


if __name__ == "__main__":
    name, corpus_path, benchmark_path, out_path, worker_count = sys.argv[1:]
    run = _before if name == "before" else _after
    print(json.dumps(run(Path(corpus_path), Path(benchmark_path), Path(out_path), int(worker_count))))
