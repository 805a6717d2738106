"""The datatrove steps tokenization runs: readers that decode only the columns they need, and a
tokenizer that also counts tokens per source, style and audience.

Kept apart from `tokenize` so that datatrove, slow to import, is only imported once a pipeline is
built, and so that the steps are module-level classes any executor can pickle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.tokens import DocumentTokenizer
from fsspec.core import url_to_fs

from cosmoforge.tables import parquet_range, rank_pieces
from cosmoforge.training.tokenize import STAT_PREFIX

# A rank's share is read in batches of this many rows, whatever the row groups' size.
READ_BATCH_ROWS = 1024


def documents(columns: dict[str, list[Any]], text_key: str, label: str, first_row: int) -> Iterator[Document]:
    """datatrove Documents from decoded columns; rows without text are left out, as datatrove does."""
    texts = columns.pop(text_key)
    ids = columns.pop("id", None)
    for row, text in enumerate(texts):
        if not text:
            continue
        doc_id = str(ids[row]) if ids is not None else f"{label}/{first_row + row}"
        yield Document(text=text, id=doc_id, metadata={name: values[row] for name, values in columns.items()})


class ColumnsReader(ParquetReader):
    """ParquetReader that decodes only the text, id and counted columns, column-wise.

    The stock reader turns every row, prompt included, into a dict, renames keys through
    its adapter and resolves the file path once per document; building documents straight
    from the few columns needed skips all of that.
    """

    def __init__(self, wanted: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.wanted = wanted

    def read_file(self, filepath: str) -> Iterator[Any]:
        with self.data_folder.open(filepath, "rb") as handle, pq.ParquetFile(handle) as parquet:
            present = [name for name in self.wanted if name in parquet.schema_arrow.names]
            row = 0
            for batch in parquet.iter_batches(batch_size=self.batch_size, columns=present):
                columns = {name: batch.column(name).to_pylist() for name in present}
                yield from documents(columns, self.text_key, filepath, row)
                row += batch.num_rows


class ShareReader(PipelineStep):
    """Reads the rows of one rank's share, a row group at a time, decoding only `wanted`.

    datatrove's readers shard by whole files, which leaves ranks idle when there are fewer
    files than ranks; shares cut by rows keep every rank equally busy.
    """

    name = "📖 Share reader"
    type = "📖 - READER"

    def __init__(self, folder: str, files: list[str], file_rows: list[int], wanted: list[str], text_key: str):
        super().__init__()
        self.folder, self.files, self.file_rows = folder, files, file_rows
        self.wanted, self.text_key = wanted, text_key

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> Iterator[Any]:
        fs, root = url_to_fs(self.folder)
        for index, first, last in rank_pieces(self.file_rows, rank, world_size):
            yield from self.read_range(fs, f"{root.rstrip('/')}/{self.files[index]}", first, last)

    def read_range(self, fs: Any, path: str, start: int, stop: int) -> Iterator[Any]:
        with fs.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
            present = [name for name in self.wanted if name in parquet.schema_arrow.names]
            for first_row, rows in parquet_range(parquet, start, stop, READ_BATCH_ROWS, present):
                columns = {name: rows.column(name).to_pylist() for name in present}
                for document in documents(columns, self.text_key, path, first_row):
                    self.stat_update("documents")
                    yield document


class CountingTokenizer(DocumentTokenizer):
    """DocumentTokenizer that also counts tokens per source, style and audience."""

    def __init__(self, counted: Mapping[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.counted = dict(counted)
        self.counts: Counter[tuple[str, str]] = Counter()

    # datatrove calls this once per encoded document with its metadata: the one place where
    # both the token count and the document's labels are in hand.
    def get_loss_values(self, document: Any, encoded: Any) -> Any:
        size = len(encoded.ids)
        for group, column in self.counted.items():
            self.counts[group, str(document.metadata.get(column))] += size
        return super().get_loss_values(document, encoded)

    def run(self, data: Any, rank: int = 0, world_size: int = 1) -> Any:
        result = super().run(data, rank, world_size)
        # Reported through datatrove's stats, which the executor merges across ranks.
        for (group, value), count in sorted(self.counts.items()):
            self.stat_update(f"{STAT_PREFIX}{group}/{value}", value=count)
        return result
