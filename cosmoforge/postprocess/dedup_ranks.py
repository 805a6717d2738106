"""Deduplication as ranks of Kubernetes Indexed Jobs (`cosmo dedup --step`).

For inputs that do not fit one machine, `run_step` runs `dedup.deduplicate`'s steps as ranks:
signatures (N ranks, each streaming its own row range), buckets (one rank per MinHash bucket,
which also finds the exact groups of one range of content hashes), cluster (1), filter (N, each
writing its kept and removed rows as parts) and finish (1, merging the parts into OUT's files).
The files they hand on live under `OUT/.work/`; the kept set, reasons, clusters and counts are
those of `deduplicate` over the whole input. One file, past the usual size: the five steps share
the work folder's layout and file formats (`Work`), which nothing else reads.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cosmoforge import tables
from cosmoforge.postprocess.dedup import (
    COLUMNS,
    EXACT,
    MINHASH,
    DedupConfig,
    DedupError,
    content_hash,
    minhash_config,
    quiet,
    signature_step,
)

# --- how the ranks hand work on ------------------------------------------------------------------
#
# `OUT/.work/` holds what one step hands the next: datatrove's signature, duplicate-pair and
# cluster files, each rank's content hashes (split by hash range, one part per buckets rank),
# the exact groups found by the buckets ranks, one verdict file per input rank and the filter
# ranks' kept/removed parts. `done/<step>/<rank>.json` says a rank finished; a step refuses to
# start before every rank of the one before it has. Every file a rank writes has a name of its
# own rank's, written whole (temporary name, then moved), so a rank that runs again replaces
# its own files and nothing else.
#
# Why the answer is the one-process answer: ranks read contiguous row ranges in input order, so
# (rank, row) sorts like the global row. Datatrove's bucket step emits, per run of equal
# signatures, consecutive pairs; the cluster step drops exact copies from each run before
# datatrove clusters, which gives the pairs datatrove would write for the group
# representatives alone. Union-find then sees the same pairs in the same order as in one
# process, so it picks the same roots and numbers the clusters the same.

STEPS = ("signatures", "buckets", "cluster", "filter", "finish")
WORK = ".work"
COUNTS = "counts.json"
KEPT_FILE = "kept.parquet"
REMOVED_FILE = "removed.parquet"
BATCH_ROWS = 4096
ROW_GROUP_ROWS = 4 * BATCH_ROWS
_HASHES = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<u8")])
_EXACT_PAIRS = np.dtype([("rank", "<u8"), ("row", "<u8"), ("rep_rank", "<u8"), ("rep_row", "<u8")])
_VERDICTS = np.dtype([("row", "<u8"), ("minhash", "u1"), ("cluster", "<i8"), ("kept_row", "<i8")])


def step_world_size(step: str, ranks: int, buckets: int) -> int:
    """How many ranks (pods of the Indexed Job) `step` runs as, for `ranks` input ranks."""
    if step not in STEPS:
        raise DedupError(f"unknown dedup step {step!r}; use one of {', '.join(STEPS)}")
    if ranks < 1 or buckets < 1:
        raise DedupError(f"ranks and buckets must be at least 1, got {ranks} and {buckets}")
    # Datatrove's bucket step takes any multiple of the bucket count; exactly one rank per bucket
    # also gives the exact-hash pass one hash range per rank.
    return {"signatures": ranks, "filter": ranks, "buckets": buckets}.get(step, 1)


# pure helpers -------------------------------------------------------------------------------------


def hash_records(digests: Sequence[bytes], rows: np.ndarray) -> np.ndarray:
    """Content hashes as sortable records (two 64-bit halves and the row they belong to)."""
    records = np.empty(len(digests), dtype=_HASHES)
    halves = np.frombuffer(b"".join(digests), dtype=">u8").reshape(-1, 2)
    records["hi"], records["lo"], records["row"] = halves[:, 0], halves[:, 1], rows
    return records


def hash_partition(records: np.ndarray, parts: int) -> np.ndarray:
    """Which of `parts` equal hash ranges each record falls in."""
    top = records["hi"] >> np.uint64(32)
    return ((top * np.uint64(parts)) >> np.uint64(32)).astype(np.int64)


def exact_pairs(per_rank: Sequence[np.ndarray]) -> np.ndarray:
    """(rank, row, rep_rank, rep_row) for every row whose text an earlier row already has."""
    if not per_rank or not sum(len(part) for part in per_rank):
        return np.empty(0, dtype=_EXACT_PAIRS)
    ranks = np.concatenate([np.full(len(part), rank, np.uint64) for rank, part in enumerate(per_rank)])
    records = np.concatenate(per_rank)
    order = np.lexsort((records["row"], ranks, records["lo"], records["hi"]))
    hi, lo = records["hi"][order], records["lo"][order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    copies = ~starts
    pairs = np.empty(int(copies.sum()), dtype=_EXACT_PAIRS)
    pairs["rank"], pairs["row"] = ranks[order][copies], records["row"][order][copies]
    pairs["rep_rank"], pairs["rep_row"] = ranks[first[copies]], records["row"][first[copies]]
    return pairs


def node_keys(ranks: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return (ranks.astype(np.uint64) << np.uint64(32)) | rows.astype(np.uint64)


def without_copies(pairs: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Datatrove duplicate pairs (n x 4: file, doc, file, doc) as they would be without `copies`.

    Each run of documents sharing a bucket signature arrives as consecutive pairs (a, b), (b, c)...;
    the run is rebuilt, the copies dropped and the rest chained again."""
    if not len(pairs):
        return pairs
    left = node_keys(pairs[:, 0], pairs[:, 1])
    right = node_keys(pairs[:, 2], pairs[:, 3])
    copy_left, copy_right = np.isin(left, copies), np.isin(right, copies)
    out: list[tuple[int, int]] = []
    run: list[int] = []
    for index in range(len(pairs)):
        if index == 0 or left[index] != right[index - 1]:
            out.extend(itertools.pairwise(run))
            run = [] if copy_left[index] else [int(left[index])]
        if not copy_right[index]:
            run.append(int(right[index]))
    out.extend(itertools.pairwise(run))
    keys = np.array(out, dtype=np.uint64).reshape(-1, 2)
    mask = np.uint64(0xFFFFFFFF)
    return np.stack(
        [keys[:, 0] >> np.uint64(32), keys[:, 0] & mask, keys[:, 1] >> np.uint64(32), keys[:, 1] & mask],
        axis=1,
    ).astype(np.uint32)


@dataclass(frozen=True)
class Verdicts:
    per_rank: list[np.ndarray]  # _VERDICTS records of each input rank, by row
    clusters: int


def verdicts(
    offsets: np.ndarray, exact: np.ndarray, members: Sequence[np.ndarray], removed: Sequence[np.ndarray]
) -> Verdicts:
    """The removed rows of every rank, with reason, cluster and kept row, as `deduplicate` gives them.

    `members[r]` holds rank r's (row, cluster id) pairs from datatrove's cluster step, `removed[r]`
    the rows its filter would drop; `exact` the exact copies (`exact_pairs`)."""
    empty = [np.zeros(0, dtype=np.int64)]
    m_rank = np.concatenate([np.full(len(m), r, np.int64) for r, m in enumerate(members)] + empty)
    m_row = np.concatenate([m[:, 0].astype(np.int64) for m in members] + empty)
    m_cluster = np.concatenate([m[:, 1].astype(np.int64) for m in members] + empty)
    m_removed = np.concatenate(
        [np.isin(m[:, 0], gone) for m, gone in zip(members, removed, strict=True)] + [np.zeros(0, bool)]
    )
    m_global = offsets[m_rank] + m_row
    count = int(m_cluster.max()) + 1 if m_cluster.size else 0
    root = np.full(count, -1, dtype=np.int64)
    root[m_cluster[~m_removed]] = m_global[~m_removed]

    order = np.argsort(m_global)
    rep_global = offsets[exact["rep_rank"].astype(np.int64)] + exact["rep_row"].astype(np.int64)
    found = np.searchsorted(m_global[order], rep_global)
    # One entry past the end, for representatives beyond every member: never a row, no cluster.
    hit = np.append(m_global[order], -1)[found] == rep_global
    rep_cluster = np.where(hit, np.append(m_cluster[order], -1)[found], -1)
    lone = np.unique(rep_global[rep_cluster < 0])
    exact_cluster = np.where(rep_cluster >= 0, rep_cluster, count + np.searchsorted(lone, rep_global))
    exact_kept = (
        np.where(rep_cluster >= 0, root[np.maximum(rep_cluster, 0)], rep_global) if count else rep_global
    )

    ranks = np.concatenate([exact["rank"].astype(np.int64), m_rank[m_removed]])
    records = np.empty(len(ranks), dtype=_VERDICTS)
    records["row"] = np.concatenate([exact["row"].astype(np.int64), m_row[m_removed]])
    records["minhash"] = np.concatenate(
        [np.zeros(len(exact), np.uint8), np.ones(int(m_removed.sum()), np.uint8)]
    )
    records["cluster"] = np.concatenate([exact_cluster, m_cluster[m_removed]])
    records["kept_row"] = np.concatenate([exact_kept, root[m_cluster[m_removed]]])
    per_rank = [np.sort(records[ranks == rank], order="row") for rank in range(len(offsets))]
    return Verdicts(per_rank, count + int(lone.size))


# the work folder ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """OUT and its `.work/` folder, on any fsspec filesystem."""

    out: str  # as the user gave it, for datatrove's folders
    fs: Any
    root: str  # OUT inside `fs`

    @classmethod
    def at(cls, out: str) -> Work:
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(out)
        fs.invalidate_cache()  # object stores list folders once; other pods have written since
        return cls(out.rstrip("/"), fs, root.rstrip("/"))

    def path(self, *parts: str) -> str:
        return "/".join((self.root, WORK, *parts))

    def uri(self, *parts: str) -> str:
        return "/".join((self.out, WORK, *parts))

    def put(self, path: str, data: bytes) -> None:
        """Write whole or not at all: a rank killed mid-write leaves only a temporary name."""
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        partial = f"{path}.partial"
        self.fs.pipe_file(partial, data)
        self.fs.mv(partial, path)

    def put_array(self, path: str, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        self.put(path, buffer.getvalue())

    def array(self, path: str) -> np.ndarray:
        return np.load(io.BytesIO(self.fs.cat_file(path)), allow_pickle=False)

    def ints(self, path: str, columns: int) -> np.ndarray:
        """A datatrove file of little-endian uint32 tuples; absent means none."""
        data = self.fs.cat_file(path) if self.fs.exists(path) else b""
        return np.frombuffer(data, dtype="<u4").reshape(-1, columns)

    def mark(self, step: str, rank: int, record: dict[str, Any]) -> None:
        self.put(self.path("done", step, f"{rank:05d}.json"), json.dumps(record).encode("utf-8"))

    def marks(self, step: str, world: int, config: DedupConfig) -> list[dict[str, Any]]:
        """The records of every rank of `step`; DedupError while one is missing or disagrees."""
        records = []
        for rank in range(world):
            path = self.path("done", step, f"{rank:05d}.json")
            if not self.fs.exists(path):
                raise DedupError(f"{self.out}: {step} rank {rank} of {world} has not finished; run it first")
            record = json.loads(self.fs.cat_file(path))
            if record["config"] != config.as_dict() or record["world_size"] != world:
                raise DedupError(
                    f"{self.out}: settings differ from those of the {step} step "
                    f"({record['world_size']} ranks, {record['config']})"
                )
            records.append(record)
        return records

    def signatures(self, config: DedupConfig) -> list[dict[str, Any]]:
        """Every signatures rank's record; their world size is read from rank 0's."""
        first = self.path("done", "signatures", f"{0:05d}.json")
        if not self.fs.exists(first):
            raise DedupError(f"{self.out}: no finished signatures step; run `--step signatures` first")
        return self.marks("signatures", json.loads(self.fs.cat_file(first))["world_size"], config)


# a rank's share of the input ----------------------------------------------------------------------


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise tables.TableError(f"{uri}: no such file or folder") from None
    except (OSError, pa.ArrowException) as error:
        raise tables.TableError(f"{uri}: cannot read: {error}") from None


def _parquet_footers(fs: Any, files: list[tables.TableFile]) -> tuple[pa.Schema, list[int]]:
    schemas, rows = [], []
    for file in files:
        with _reading(file.uri), fs.open(file.path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            schemas.append(metadata.schema.to_arrow_schema())
            rows.append(metadata.num_rows)
    return pa.unify_schemas(schemas, promote_options="permissive"), rows


def _parquet_rows(
    fs: Any, file: tables.TableFile, start: int, stop: int, schema: pa.Schema
) -> Iterator[pa.RecordBatch]:
    """Rows [start, stop) of a parquet file, a batch at a time; only their row groups are read."""
    with _reading(file.uri), fs.open(file.path, "rb") as handle:
        for _, batch in tables.parquet_range(pq.ParquetFile(handle), start, stop, BATCH_ROWS):
            yield tables._conform(batch, schema)


@dataclass(frozen=True)
class Share:
    """One rank's rows: their schema (None for a rank without a file) and their batches."""

    schema: pa.Schema | None
    batches: Iterator[pa.RecordBatch]


def open_share(input_uri: str, rank: int, world: int) -> Share:
    """Rank `rank`'s contiguous share of the input rows, in input order.

    Parquet is cut into row ranges from the footers, read one batch at a time; other formats
    are cut by whole files, each read whole (as `tables.scan` reads them)."""
    fs, files = tables.list_files(input_uri)
    if all(file.format == "parquet" for file in files):
        schema, rows = _parquet_footers(fs, files)
        pieces = tables.rank_pieces(rows, rank, world)
        batches = (
            batch
            for index, start, stop in pieces
            for batch in _parquet_rows(fs, files[index], start, stop, schema)
        )
        return Share(schema, batches)
    mine = files[len(files) * rank // world : len(files) * (rank + 1) // world]
    if not mine:
        return Share(None, iter(()))
    parts = [tables.read_rows(file, 0, 2**62, fs) for file in mine]
    table = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="permissive")
    return Share(table.schema, iter(table.to_batches(BATCH_ROWS)))


def check_columns(uri: str, schema: pa.Schema, text_field: str) -> None:
    try:
        tables.text_type(schema, text_field)
    except tables.TableError as error:
        raise tables.TableError(f"{uri}: {error}") from None
    clash = [c for c in COLUMNS if c in schema.names]
    if clash:
        raise tables.TableError(
            f"{uri}: input already has column(s) {', '.join(clash)}; was it deduplicated before?"
        )


# the steps ----------------------------------------------------------------------------------------


@dataclass
class _Signed:
    """What the signatures rank learns while datatrove reads its documents."""

    rows: int = 0
    empty: int = 0
    hashes: list[np.ndarray] = field(default_factory=list)  # hash_records, a batch each


def _rank_documents(share: Share, text_field: str, rank: int, signed: _Signed) -> Iterator[Any]:
    """The rank's rows as datatrove documents, an id of (rank, row) each; exact copies are signed
    too and are taken out of the duplicate pairs later, when every rank's hashes are known."""
    from datatrove.data import Document

    for batch in share.batches:
        texts = tables.text_column(batch, text_field, signed.rows)
        first = signed.rows
        signed.hashes.append(
            hash_records(
                [content_hash(text) for text in texts], np.arange(first, first + len(texts), dtype=np.uint64)
            )
        )
        signed.empty += sum(1 for text in texts if not text.strip())
        for text in texts:
            yield Document(text=text, id=f"{rank}/{signed.rows}")
            signed.rows += 1


def run_signatures(
    input_uri: str, out: str, config: DedupConfig, rank: int, world: int, text_field: str = "text"
) -> dict[str, Any]:
    share = open_share(input_uri, rank, world)
    if share.schema is not None:
        check_columns(input_uri, share.schema, text_field)
    work, signed = Work.at(out), _Signed()
    with quiet():
        signature_step(work.uri("signatures"), config).run(
            _rank_documents(share, text_field, rank, signed), rank=rank, world_size=world
        )
    if config.exact:
        records = np.concatenate([np.empty(0, dtype=_HASHES), *signed.hashes])
        parts = hash_partition(records, config.buckets)
        for part in range(config.buckets):
            work.put_array(work.path("hashes", f"{part:03d}", f"{rank:05d}.npy"), records[parts == part])
    record = {"world_size": world, "config": config.as_dict(), "rows": signed.rows, "empty": signed.empty}
    work.mark("signatures", rank, record)
    return record


def run_buckets(out: str, config: DedupConfig, rank: int, world: int) -> dict[str, Any]:
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    work = Work.at(out)
    signature_ranks = len(work.signatures(config))
    _check_no_stale_signatures(work, rank, signature_ranks)
    with quiet():
        MinhashDedupBuckets(
            input_folder=work.uri("signatures"),
            output_folder=work.uri("dups"),
            config=minhash_config(config),
        ).run(None, rank=rank, world_size=world)
    if config.exact:
        hashes = [
            work.array(work.path("hashes", f"{rank:03d}", f"{r:05d}.npy")) for r in range(signature_ranks)
        ]
        work.put_array(work.path("exact", f"{rank:03d}.npy"), exact_pairs(hashes))
    record = {"world_size": world, "config": config.as_dict()}
    work.mark("buckets", rank, record)
    return record


def _check_no_stale_signatures(work: Work, bucket: int, ranks: int) -> None:
    """Datatrove reads every signature file of the bucket's folder: one of a rank beyond this run's
    (a run with more ranks before, in the same OUT) would join this run's pairs."""
    folder = work.path("signatures", f"bucket_{bucket:03d}")
    names = [path.rsplit("/", 1)[-1] for path in work.fs.ls(folder, detail=False)]
    stale = [n for n in names if n.endswith(".minhash.sig") and int(n.split(".")[0]) >= ranks]
    if stale:
        raise DedupError(f"{folder} holds signatures of another run ({stale[0]}); remove {work.uri()} first")


def run_cluster(out: str, config: DedupConfig) -> dict[str, Any]:
    from datatrove.pipeline.dedup.minhash import MinhashDedupCluster

    work = Work.at(out)
    signed = work.signatures(config)
    work.marks("buckets", config.buckets, config)
    exact = _exact_copies(work, config)
    copies = np.sort(node_keys(exact["rank"], exact["row"]))
    for bucket in range(config.buckets):
        name = f"{bucket:05d}_00.dups"
        pairs = without_copies(work.ints(work.path("dups", name), 4), copies)
        work.put(work.path("dups-representatives", name), pairs.astype("<u4").tobytes())
    if work.fs.exists(work.path("clusters")):  # what a killed run left must not mix with this run's
        work.fs.rm(work.path("clusters"), recursive=True)
    with quiet():
        MinhashDedupCluster(
            input_folder=work.uri("dups-representatives"),
            output_folder=work.uri("clusters"),
            config=minhash_config(config),
            save_cluster_id=True,
        ).run(None, 0, 1)
    rows = np.array([record["rows"] for record in signed], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    members = [work.ints(work.path("clusters", f"{r:06d}.clusters"), 2) for r in range(len(signed))]
    removed = [work.ints(work.path("clusters", f"{r:06d}.remove"), 1)[:, 0] for r in range(len(signed))]
    found = verdicts(offsets, exact, members, removed)
    for rank, records in enumerate(found.per_rank):
        work.put_array(work.path("verdicts", f"{rank:05d}.npy"), records)
    counts = _counts(found, int(rows.sum()), sum(record["empty"] for record in signed), config)
    work.put(work.path(COUNTS), json.dumps(counts, indent=2).encode("utf-8"))
    record = {"world_size": 1, "config": config.as_dict(), "counts": counts}
    work.mark("cluster", 0, record)
    return record


def _exact_copies(work: Work, config: DedupConfig) -> np.ndarray:
    if not config.exact:
        return np.empty(0, dtype=_EXACT_PAIRS)
    return np.concatenate([work.array(work.path("exact", f"{b:03d}.npy")) for b in range(config.buckets)])


def _counts(found: Verdicts, documents: int, empty: int, config: DedupConfig) -> dict[str, Any]:
    minhash = sum(int(records["minhash"].sum()) for records in found.per_rank)
    removed = sum(len(records) for records in found.per_rank)
    return {
        "documents": documents,
        "kept": documents - removed,
        "removed": removed,
        "removed_exact": removed - minhash,
        "removed_minhash": minhash,
        "clusters": found.clusters,
        "empty_documents": empty,
        "config": config.as_dict(),
    }


def _removed_columns(records: np.ndarray) -> dict[str, pa.Array]:
    reasons = np.where(records["minhash"] == 1, MINHASH, EXACT).tolist()
    return {
        "dedup_reason": pa.array(reasons, type=pa.string()),
        "dedup_cluster": pa.array(records["cluster"], type=pa.int64()),
        "dedup_kept_row": pa.array(records["kept_row"], type=pa.int64()),
    }


def removed_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema(
        [*schema, pa.field(COLUMNS[0], pa.string()), *(pa.field(c, pa.int64()) for c in COLUMNS[1:])]
    )


class _PartWriter:
    """A parquet file written batch by batch under a temporary name, moved into place when whole.

    Filtered batches are small; they are gathered into row groups of up to ROW_GROUP_ROWS rows so
    that the next stage does not read thousands of tiny ones."""

    def __init__(self, work: Work, path: str, schema: pa.Schema) -> None:
        self.work, self.path, self.schema = work, path, schema
        self.pending: list[pa.RecordBatch] = []
        work.fs.makedirs(work.fs._parent(path), exist_ok=True)
        self.handle = work.fs.open(f"{path}.partial", "wb")
        self.writer = pq.ParquetWriter(self.handle, schema, compression="zstd")

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows:
            self.pending.append(batch)
        if sum(b.num_rows for b in self.pending) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_batches(self.pending, self.schema))
            self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.handle.close()
        self.work.fs.mv(f"{self.path}.partial", self.path)


def run_filter(
    input_uri: str, out: str, config: DedupConfig, rank: int, world: int, text_field: str = "text"
) -> dict[str, Any]:
    work = Work.at(out)
    signed = work.signatures(config)
    if world != len(signed):
        raise DedupError(f"the filter step runs as {len(signed)} ranks, as signatures did, not {world}")
    work.marks("cluster", 1, config)
    records = work.array(work.path("verdicts", f"{rank:05d}.npy"))
    share = open_share(input_uri, rank, world)
    rows = 0
    if share.schema is not None:
        kept = _PartWriter(work, work.path("parts", "kept", f"{rank:05d}.parquet"), share.schema)
        removed = _PartWriter(
            work, work.path("parts", "removed", f"{rank:05d}.parquet"), removed_schema(share.schema)
        )
        for batch in share.batches:
            low, high = np.searchsorted(records["row"], [rows, rows + batch.num_rows])
            mine = records[low:high]
            drop = np.zeros(batch.num_rows, dtype=bool)
            drop[(mine["row"] - rows).astype(np.int64)] = True
            kept.write(batch.filter(pa.array(~drop)))
            gone = batch.filter(pa.array(drop))
            extra = _removed_columns(mine)
            removed.write(
                pa.RecordBatch.from_arrays(
                    [*gone.columns, *extra.values()], schema=removed_schema(batch.schema)
                )
            )
            rows += batch.num_rows
        kept.close()
        removed.close()
    if rows != signed[rank]["rows"]:
        raise DedupError(
            f"{input_uri}: rank {rank} now reads {rows} rows, not {signed[rank]['rows']}; input changed"
        )
    record = {"world_size": world, "config": config.as_dict(), "parts": share.schema is not None}
    work.mark("filter", rank, record)
    return record


def run_finish(out: str, config: DedupConfig) -> dict[str, Any]:
    """Merge the parts into OUT's files, each appearing whole, then remove the work folder."""
    work = Work.at(out)
    counts_path = f"{work.root}/{COUNTS}"
    finished = work.fs.exists(work.path("done", "finish", f"{0:05d}.json"))
    if finished or (not work.fs.exists(work.path()) and work.fs.exists(counts_path)):
        _remove_work(work)  # a finish run again, or killed while it cleaned up: OUT's files are whole
        return dict(json.loads(work.fs.cat_file(counts_path)))
    filtered = work.marks("filter", len(work.signatures(config)), config)
    ranks = [rank for rank, record in enumerate(filtered) if record["parts"]]
    if not ranks:
        raise DedupError(f"{out}: no rank wrote any rows")
    kept_parts = [work.path("parts", "kept", f"{r:05d}.parquet") for r in ranks]
    schema = pa.unify_schemas([_part_schema(work, p) for p in kept_parts], promote_options="permissive")
    _merge(work, kept_parts, f"{work.root}/{KEPT_FILE}", schema)
    removed_parts = [work.path("parts", "removed", f"{r:05d}.parquet") for r in ranks]
    _merge(work, removed_parts, f"{work.root}/{REMOVED_FILE}", removed_schema(schema))
    counts = work.fs.cat_file(work.path(COUNTS))
    work.fs.pipe_file(f"{counts_path}.partial", counts)
    work.fs.mv(f"{counts_path}.partial", counts_path)
    work.mark("finish", 0, {"world_size": 1, "config": config.as_dict()})
    _remove_work(work)
    return dict(json.loads(counts))


def _part_schema(work: Work, path: str) -> pa.Schema:
    with work.fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).schema_arrow


def _merge(work: Work, parts: list[str], target: str, schema: pa.Schema) -> None:
    """Parts one row group at a time into `target`, which appears only when whole."""
    writer = _PartWriter(work, target, schema)
    for path in parts:
        with work.fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.metadata.num_row_groups):
                for batch in parquet.read_row_group(group).to_batches():
                    writer.write(tables._conform(batch, schema))
    writer.close()


def _remove_work(work: Work) -> None:
    """Remove the work folder, finish's own mark last: until it goes, a finish run again knows that
    OUT's files are complete."""
    keep = {work.path("done"), work.path("done", "finish")}
    for folder in (work.path(), work.path("done")):
        if work.fs.exists(folder):
            for entry in work.fs.ls(folder, detail=False):
                if entry.rstrip("/") not in keep:
                    work.fs.rm(entry, recursive=True)
    if work.fs.exists(work.path()):
        work.fs.rm(work.path(), recursive=True)


def run_step(
    step: str,
    input_uri: str,
    out: str,
    config: DedupConfig,
    rank: int,
    world: int | None,
    text_field: str = "text",
) -> dict[str, Any]:
    """One rank of one step; `world` None takes the world size the step must have."""
    if step == "signatures":
        world = world or 1
    elif step == "filter" and world is None:
        world = len(Work.at(out).signatures(config))
    expected = step_world_size(step, world or 1, config.buckets)
    world = expected if world is None else world
    if world != expected:
        raise DedupError(f"the {step} step runs as {expected} rank(s), not {world}")
    if not 0 <= rank < world:
        raise DedupError(f"rank {rank} is outside 0..{world - 1}")
    if step == "signatures":
        return run_signatures(input_uri, out, config, rank, world, text_field)
    if step == "buckets":
        return run_buckets(out, config, rank, world)
    if step == "cluster":
        return run_cluster(out, config)
    if step == "filter":
        return run_filter(input_uri, out, config, rank, world, text_field)
    return run_finish(out, config)
