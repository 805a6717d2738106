"""What torchrun starts on every GPU of the training Job: nanotron's trainer on datatrove tokens.

nanotron 0.2's own `run_train.py` is not part of its wheel and can only tokenize Hugging Face
datasets on the fly (with no dataset configured it silently trains on random tokens). This
launcher keeps everything else nanotron's — config loader, `DistributedTrainer`, the CLM
collator that handles pipeline ranks — and swaps the data source for windows of
`sequence_length + 1` tokens read with datatrove's `DatatroveFolderDataset` straight from object
storage. It also reports progress and ships checkpoints back:

- every logged step, rank 0 rewrites `cosmoforge.generation.metrics` (a small JSON object: the latest step,
  loss, tokens/s and the recent history) in object storage; the operator's status timer reads
  it into the run's status;
- after the last step, the first process of every node uploads the node's checkpoint shards
  from the pod's local disk to `cosmoforge.checkpoints`.

Runs only where nanotron, flash-attn and CUDA are installed (the trainer image); the pieces
that do not need them (arguments, progress records) are plain functions tested on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

HISTORY = 500


@dataclass(frozen=True)
class ProgressRecord:
    step: int
    total_steps: int
    loss: float
    tokens_per_second: float
    consumed_tokens: int
    learning_rate: float
    time: float


@dataclass
class Progress:
    """The metrics file the operator reads: latest record first, bounded history after."""

    run: str
    latest: ProgressRecord | None = None
    history: list[ProgressRecord] = field(default_factory=list)

    def add(self, record: ProgressRecord) -> None:
        self.latest = record
        self.history = [*self.history, record][-HISTORY:]

    def to_json(self) -> str:
        return json.dumps(
            {
                "run": self.run,
                "latest": asdict(self.latest) if self.latest else None,
                "history": [asdict(record) for record in self.history],
            }
        )


def write_text(uri: str, text: str) -> None:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, text.encode("utf-8"))


def upload_folder(local: str, remote: str) -> int:
    """Copy every file under `local` to `remote`, keeping relative paths; returns the count."""
    from fsspec.core import url_to_fs

    fs, base = url_to_fs(remote)
    count = 0
    for root, _, files in os.walk(local):
        for name in files:
            source = os.path.join(root, name)
            relative = os.path.relpath(source, local).replace(os.sep, "/")
            target = f"{base.rstrip('/')}/{relative}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(source, target)
            count += 1
    return count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="nanotron training on datatrove token files")
    parser.add_argument("--config-file", required=True, help="nanotron YAML rendered by cosmoforge")
    return parser.parse_args(argv)


def cosmoforge_section(config_file: str) -> dict[str, Any]:
    import yaml

    with open(config_file, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    section = document.get("cosmoforge") if isinstance(document, dict) else None
    if not isinstance(section, dict) or "tokens" not in section:
        raise SystemExit(f"{config_file} has no cosmoforge.tokens: render it with cosmoforge")
    return section


def token_loader(trainer: Any, config: Any, extra: dict[str, Any]) -> tuple[Any, Any]:  # pragma: no cover
    """The datatrove token files as nanotron micro-batches: this data-parallel rank's share."""
    from datatrove.utils.dataset import DatatroveFolderDataset
    from nanotron import distributed as dist
    from nanotron.dataloader import DataCollatorForCLM, EmptyInfiniteDataset, get_dataloader_worker_init
    from nanotron.parallel.pipeline_parallel.utils import get_input_output_pp_ranks
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    context = trainer.parallel_context
    input_pp_rank, output_pp_rank = get_input_output_pp_ranks(model=trainer.model)
    windows: Any = DatatroveFolderDataset(
        extra["tokens"],
        seq_len=trainer.sequence_length,
        filename_pattern="*.ds",
        token_size=int(extra.get("token_size", 2)),
    )
    workers = config.data.num_loading_workers if config.data else 1
    if dist.get_rank(context.pp_pg) not in (input_pp_rank, output_pp_rank):
        # Middle pipeline stages take activations, not tokens: nanotron's collator only needs
        # empty rows there to hand out tensor pointers.
        windows, workers = EmptyInfiniteDataset(length=len(windows)), 0
    sampler: Any = DistributedSampler(
        windows,
        num_replicas=context.dp_pg.size(),
        rank=context.dp_pg.rank(),
        seed=config.general.seed,
        drop_last=True,
    )
    loader = DataLoader(
        windows,
        batch_size=trainer.micro_batch_size,
        sampler=sampler,
        collate_fn=DataCollatorForCLM(
            sequence_length=trainer.sequence_length,
            input_pp_rank=input_pp_rank,
            output_pp_rank=output_pp_rank,
            parallel_context=context,
        ),
        drop_last=True,
        num_workers=workers,
        worker_init_fn=get_dataloader_worker_init(dl_rank=context.dp_pg.rank()),
    )
    return sampler, loader


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - needs GPUs and nanotron
    args = parse_args(argv)
    extra = cosmoforge_section(args.config_file)

    from nanotron import distributed as dist
    from nanotron.config import Config, get_config_from_file
    from nanotron.trainer import DistributedTrainer

    config = get_config_from_file(args.config_file, config_class=Config, skip_unused_config_keys=True)
    progress = Progress(run=str(config.general.run))

    class ReportingTrainer(DistributedTrainer):
        def train_step_logs(self, outputs: Any, loss_avg: Any) -> None:
            super().train_step_logs(outputs, loss_avg)
            if loss_avg is None or dist.get_rank(self.parallel_context.world_pg) not in self.logger_ranks:
                return
            elapsed = max(1e-9, time.time() - self.iteration_start_time)
            progress.add(
                ProgressRecord(
                    step=int(self.iteration_step),
                    total_steps=int(self.config.tokens.train_steps),
                    loss=float(loss_avg.item()),
                    tokens_per_second=self.global_batch_size * self.sequence_length / elapsed,
                    consumed_tokens=int(self.consumed_train_samples * self.sequence_length),
                    learning_rate=float(self.lr_scheduler.get_last_lr()[0]),
                    time=time.time(),
                )
            )
            write_text(extra["metrics"], progress.to_json())

    trainer = ReportingTrainer(config)
    sampler, loader = token_loader(trainer, config, extra)

    def epochs() -> Iterator[dict[str, Any]]:
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            # nanotron's trainer moves each batch to the GPU itself.
            yield from loader
            epoch += 1

    trainer.train(epochs())
    if config.tokens.train_steps % config.checkpoints.checkpoint_interval:
        trainer.save_checkpoint()
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        upload_folder(str(config.checkpoints.checkpoints_path), extra["checkpoints"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
