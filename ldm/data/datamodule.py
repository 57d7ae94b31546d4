"""LightningDataModule over WebDataset shards: the one data entry point for both stages."""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.data.pipeline import ShardSpec, TrainStream, ValStream, count_samples, expand_shards

# TrainStream divides each epoch between workers itself, so its length is exact; Lightning's
# generic caution about IterableDataset lengths with several workers does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class ShardDataModule(pl.LightningDataModule):
    """(image, caption) batches from img2dataset-style shards, split across ranks and workers.

    Batches are {"image": Bx3xRxR float in [-1, 1], "caption": [str], "key": [str]}.
    `epoch_length` is the number of training batches per rank per epoch; left as
    None it is the data set size / (world_size * batch_size), read from the
    sample counts stored next to the shards (info.json or img2dataset's
    *_stats.json).
    """

    def __init__(
        self,
        *,
        train_shards: ShardSpec | None,
        val_shards: ShardSpec | None,
        resolution: int = 32,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        epoch_length: int | None = None,
        seed: int = 0,
        caption_key: str = "txt",
    ) -> None:
        super().__init__()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.epoch_length = epoch_length
        self.seed = seed
        self.caption_key = caption_key
        self.train_set: TrainStream | None = None
        self.val_set: ValStream | None = None
        self._check_values()  # fail at start-up, before a trainer holds devices

    def _rank_world(self) -> tuple[int, int]:
        """Rank and world size from the trainer, else torch.distributed, else a single process."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _check_values(self) -> None:
        for name in ("resolution", "batch_size", "val_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(
                f"data.epoch_length must be a positive integer or None, got {self.epoch_length!r}"
            )
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers!r}")
        if not self.caption_key:
            raise ValueError("data.caption_key must name a tar member extension, e.g. 'txt'")

    def setup(self, stage: str | None = None) -> None:
        """Check the settings and that every local shard exists, then build this rank's streams.

        Rebuilt on every call, so a manual setup() before the trainer is attached
        cannot leave streams built for the wrong rank.
        """
        self._check_values()
        rank, world_size = self._rank_world()
        if stage in (None, "fit"):
            if self.train_shards is None:
                raise ValueError("data.train_shards is required for training")
            urls = expand_shards(self.train_shards)
            epoch_length = self.epoch_length
            if epoch_length is None:
                total = count_samples(urls)
                if total is None:
                    raise ValueError(
                        "data.epoch_length is required: the number of training samples is unknown "
                        "(no info.json or *_stats.json next to the shards)"
                    )
                epoch_length = max(1, total // (world_size * self.batch_size))
            self.train_set = TrainStream(
                urls,
                resolution=self.resolution,
                batch_size=self.batch_size,
                epoch_length=epoch_length,
                rank=rank,
                world_size=world_size,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
                caption_key=self.caption_key,
            )
        if stage in (None, "fit", "validate") and self.val_shards is not None:
            self.val_set = ValStream(
                expand_shards(self.val_shards),
                resolution=self.resolution,
                batch_size=self.val_batch_size,
                rank=rank,
                world_size=world_size,
                caption_key=self.caption_key,
            )

    def _loader(self, dataset: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # the streams batch themselves
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Exactly `epoch_length` batches per epoch on this rank."""
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader | list:
        """One ordered pass over this rank's part of the validation shards ([] when there are none)."""
        if self.val_set is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        return self._loader(self.val_set)
