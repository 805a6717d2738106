"""What the training Job's pods run: `prepare` once per pod, then `train` on every GPU (torchrun).

nanotron 0.2's own `run_train.py` is not part of its wheel and can only tokenize Hugging Face
datasets on the fly (with no dataset configured it silently trains on random tokens). This
launcher keeps everything else nanotron's — config loader, `DistributedTrainer`, the CLM
collator that handles pipeline ranks — and swaps the data source for windows of
`sequence_length + 1` tokens read with datatrove's `DatatroveFolderDataset` straight from object
storage.

- `prepare` (cosmo's environment: it reads the spec) renders the nanotron config from the
  run's `spec.yaml` and the token folder's `metrics.json` (vocabulary, EOS, token width), and
  when object storage already holds a checkpoint of this training (`latest.txt`) downloads it
  to the pod's disk and names it as `resume_checkpoint_path`: a replaced pod carries on from
  the last checkpoint instead of starting again.
- `train` (nanotron's environment, under torchrun) runs the trainer. Every checkpoint nanotron
  saves is uploaded by the first process of each node, and only when all nodes are done does
  rank 0 move `latest.txt` in object storage, so a resume never sees half a checkpoint. Every
  logged step, rank 0 rewrites `progress.json` (`cosmoforge.training.metrics`: latest step,
  loss, tokens/s, MFU and the recent history, the loss curve) beside the checkpoints.

Only `train_main` needs nanotron, flash-attn and CUDA (the trainer image); the rest are plain
functions tested on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cosmoforge.training.metrics import Progress, ProgressRecord
from cosmoforge.training.peaks import peak_tflops
from cosmoforge.training.remote import download_folder, join, read_bytes, upload_folder, write_text

LATEST = "latest.txt"


def model_flops_utilisation(
    tokens_per_second: float, parameters: int, gpus: int, peak: float | None
) -> float | None:
    """MFU as `benchmarks/gpu_train.py` counts it: 6·N FLOPs per token over the summed peak."""
    if not peak or gpus < 1:
        return None
    return 6 * parameters * tokens_per_second / (gpus * peak * 1e12)


def resume_position(
    consumed_samples: int, replicas: int, micro_batch: int, batches_per_epoch: int
) -> tuple[int, int]:
    """(epoch, micro-batches to skip in it) for a data-parallel replica after `consumed_samples`
    samples of the whole run: where the interrupted run's data loader stood."""
    done = consumed_samples // (replicas * micro_batch)
    return divmod(done, max(1, batches_per_epoch))


def cosmoforge_section(config_file: str) -> dict[str, Any]:
    import yaml

    with open(config_file, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    section = document.get("cosmoforge") if isinstance(document, dict) else None
    if not isinstance(section, dict) or "tokens" not in section:
        raise SystemExit(f"{config_file} has no cosmoforge.tokens: render it with cosmoforge")
    return section


# --- prepare: config and resume, before torchrun ------------------------------------------------


def prepare(root: str, tokens: str, checkpoints: str, metrics: str, scratch: str) -> dict[str, Any]:
    """Render the nanotron config into `scratch`, with the latest stored checkpoint to resume."""
    import yaml

    from cosmoforge.spec.model import parse_run
    from cosmoforge.training import TrainingError
    from cosmoforge.training.nanotron_config import CONFIG_FILE, DataPaths, render_config, to_yaml
    from cosmoforge.training.tokenize import read_metrics

    text = read_bytes(join(root, "spec.yaml"))
    if text is None:
        raise TrainingError(f"{root}/spec.yaml is missing: the run's spec is written when the run starts")
    run = parse_run(yaml.safe_load(text), source=join(root, "spec.yaml"))
    training = run.spec.training
    if training is None:
        raise TrainingError(f"run {run.name} has no training section")
    token_metrics = read_metrics(tokens)
    tokenizer = token_metrics["tokenizer"]
    config = render_config(
        training,
        run_name=run.name,
        paths=DataPaths(tokens, checkpoints, metrics, local_checkpoints=scratch),
        vocab_size=int(tokenizer["vocab_size"]),
        eos_token_id=int(tokenizer["eos_token_id"]),
        token_size=int(tokenizer["token_size"]),
        checkpoint_interval=training.checkpoint_every,
    )
    latest = read_bytes(join(checkpoints, LATEST))
    if latest is not None:
        step = latest.decode().strip()
        download_folder(join(checkpoints, step), Path(scratch) / step)
        (Path(scratch) / LATEST).write_text(step, encoding="utf-8")
        config["checkpoints"]["resume_checkpoint_path"] = scratch
    Path(scratch).mkdir(parents=True, exist_ok=True)
    (Path(scratch) / CONFIG_FILE).write_text(to_yaml(config), encoding="utf-8")
    return config


# --- train: under torchrun, with nanotron -------------------------------------------------------


def token_loader(trainer: Any, config: Any, extra: dict[str, Any]) -> tuple[Any, Any]:  # pragma: no cover
    """The datatrove token files as nanotron micro-batches: this data-parallel rank's share."""
    from datatrove.utils.dataset import DatatroveFolderDataset
    from nanotron import distributed as dist
    from nanotron.dataloader import DataCollatorForCLM, EmptyInfiniteDataset, get_dataloader_worker_init
    from nanotron.parallel.pipeline_parallel.utils import get_input_output_pp_ranks
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    class SkippingSampler(DistributedSampler):
        """Skips the micro-batches a resumed run already consumed, without loading them."""

        skip = 0

        def __iter__(self) -> Iterator[int]:
            indices = list(super().__iter__())
            return iter(indices[self.skip * trainer.micro_batch_size :])

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
    sampler = SkippingSampler(
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


def train_main(config_file: str) -> int:  # pragma: no cover - needs GPUs and nanotron
    extra = cosmoforge_section(config_file)

    import torch
    from nanotron import distributed as dist
    from nanotron.config import Config, get_config_from_file
    from nanotron.trainer import DistributedTrainer

    from cosmoforge.training.presets import get_preset

    config = get_config_from_file(config_file, config_class=Config, skip_unused_config_keys=True)
    progress = Progress(run=str(config.general.run))
    vocab = int(config.model.model_config.vocab_size)
    parameters = get_preset(str(extra["preset"])).parameter_count(vocab_size=vocab)
    peak = float(os.environ.get("COSMO_GPU_PEAK_TFLOPS") or 0) or peak_tflops(torch.cuda.get_device_name())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    class ReportingTrainer(DistributedTrainer):
        def train_step_logs(self, outputs: Any, loss_avg: Any) -> None:
            super().train_step_logs(outputs, loss_avg)
            if loss_avg is None or dist.get_rank(self.parallel_context.world_pg) not in self.logger_ranks:
                return
            elapsed = max(1e-9, time.time() - self.iteration_start_time)
            rate = self.global_batch_size * self.sequence_length / elapsed
            progress.add(
                ProgressRecord(
                    step=int(self.iteration_step),
                    total_steps=int(self.config.tokens.train_steps),
                    loss=float(loss_avg.item()),
                    tokens_per_second=rate,
                    consumed_tokens=int(self.consumed_train_samples * self.sequence_length),
                    learning_rate=float(self.lr_scheduler.get_last_lr()[0]),
                    time=time.time(),
                    mfu=model_flops_utilisation(
                        rate, parameters, self.parallel_context.world_pg.size(), peak
                    ),
                )
            )
            write_text(extra["metrics"], progress.to_json())

        def save_checkpoint(self) -> Path:
            path: Path = super().save_checkpoint()
            world = self.parallel_context.world_pg
            dist.barrier(world)  # every rank's shards are on its node's disk
            if local_rank == 0:
                upload_folder(path, join(extra["checkpoints"], path.name))
            dist.barrier(world)  # every node's shards are in object storage
            if dist.get_rank(world) == 0:
                write_text(join(extra["checkpoints"], LATEST), path.name)
            return path

    trainer = ReportingTrainer(config)
    sampler, loader = token_loader(trainer, config, extra)
    epoch, skip = resume_position(
        int(trainer.consumed_train_samples),
        trainer.parallel_context.dp_pg.size(),
        trainer.micro_batch_size,
        len(loader),
    )

    def epochs() -> Iterator[dict[str, Any]]:
        nonlocal epoch, skip
        while True:
            sampler.set_epoch(epoch)
            sampler.skip = skip
            # nanotron's trainer moves each batch to the GPU itself.
            yield from loader
            epoch, skip = epoch + 1, 0

    trainer.train(epochs())
    if config.tokens.train_steps % config.checkpoints.checkpoint_interval:
        trainer.save_checkpoint()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="nanotron training on datatrove token files")
    commands = parser.add_subparsers(dest="command", required=True)
    ready = commands.add_parser("prepare", help="render the config and fetch the checkpoint to resume")
    ready.add_argument("--root", required=True, help="the run's folder (holds spec.yaml)")
    ready.add_argument("--tokens", required=True, help="the `cosmo tokenize` folder")
    ready.add_argument("--checkpoints", required=True, help="where nanotron's checkpoints are kept")
    ready.add_argument("--metrics", required=True, help="the progress file to write while training")
    ready.add_argument("--scratch", required=True, help="the pod's local folder for checkpoints")
    train = commands.add_parser("train", help="run nanotron (under torchrun)")
    train.add_argument("--config-file", required=True, help="nanotron YAML rendered by `prepare`")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "train":
        return train_main(args.config_file)
    from cosmoforge.training import TrainingError

    try:
        config = prepare(args.root, args.tokens, args.checkpoints, args.metrics, args.scratch)
    except TrainingError as error:
        print(f"prepare: error: {error}", file=sys.stderr)
        return 2  # bad settings: the Job's pod failure policy fails at once
    resume = config["checkpoints"]["resume_checkpoint_path"]
    print(
        f"nanotron config in {args.scratch}; " + (f"resuming from {resume}" if resume else "starting fresh")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
