"""LightningDataModule over WebDataset shards: the one data entry point for both stages."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.data import resume
from ldm.data.buckets import Bucket, bucket_name, parse_buckets
from ldm.data.callbacks import DataStatsCallback
from ldm.data.captions import caption_keys
from ldm.data.consumed import ConsumedCallback
from ldm.data.decode import DecodeOptions
from ldm.data.latents import check_latents, latents_folder, latents_info
from ldm.data.pipeline import (
    MODES,
    ShardSpec,
    TrainStream,
    ValStream,
    count_samples,
    expand_shards,
    expand_sources,
    shard_counts,
    shuffled,
)
from ldm.data.text_embeddings import has_text_embeddings, load_empty_context
from ldm.train.signals import ignore_job_signals

log = logging.getLogger(__name__)

# TrainStream divides each epoch between workers itself, so its length is exact; Lightning's
# generic caution about IterableDataset lengths with several workers does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class ShardDataModule(pl.LightningDataModule):
    """(image, caption) batches from img2dataset-style shards, split across ranks and workers.

    Batches are {"image": Bx3xRxR float in [-1, 1], "caption": [str], "key": [str],
    "data_stats": {name: int}}. `mode="finite"` makes each epoch one pass over the
    data (sample counts from *_stats.json / info.json, else a one-time scan cached
    in `index_file`); `mode="resampled"` makes it `epoch_length` batches per rank of
    an endless stream (left as None: data set size / (world_size * batch_size),
    from recorded counts). Either way every rank gets the same number of batches.
    In resampled mode `train_shards` may mix sources: [{"shards": spec, "weight": w}, ...].
    `buckets` (see ldm.data.buckets) makes every batch one aspect-ratio bucket
    (Bx3xHxW, plus "crop_top_left" and "original_size", Bx2 long); None keeps square crops.
    `latents=True` reads shards written by `python -m ldm.data.latents` ("moments" in place of
    "image") and refuses them when `autoencoder` is given and did not make them.

    The module adds a `DataStatsCallback` to its trainer, which sums the skip
    counts over ranks, logs them and stops the run when more than
    `max_skip_fraction` of the samples read could not be used. Its state_dict holds
    how far into the epoch training got, so a restart resumes mid-epoch.
    """

    def __init__(
        self,
        *,
        train_shards: ShardSpec | Sequence[dict[str, Any]] | None,
        val_shards: ShardSpec | None,
        resolution: int = 32,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        prefetch_factor: int | None = None,
        shuffle_buffer: int = 1000,
        epoch_length: int | None = None,
        epoch_samples: int | None = None,
        seed: int = 0,
        caption_key: str | Sequence[str] = "txt",
        mode: str = "resampled",
        index_file: str | None = None,
        crop: str = "center",
        flip_p: float = 0.0,
        background: Sequence[int] = (255, 255, 255),
        min_size: int = 0,
        max_skip_fraction: float = 0.1,
        retries: int = 2,
        latents: bool = False,
        autoencoder: str | None = None,
        caption_json_key: str | None = None,
        text_embeddings: bool | None = None,
        buckets: Any = None,
        consumed_log: str | None = None,
    ) -> None:
        super().__init__()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.shuffle_buffer = shuffle_buffer
        self.epoch_length = epoch_length
        self.epoch_samples = epoch_samples
        self.seed = seed
        self.caption_key = caption_key
        self.mode = mode
        self.index_file = index_file
        self.crop = crop
        self.flip_p = flip_p
        self.background = tuple(background)
        self.min_size = min_size
        self.max_skip_fraction = max_skip_fraction
        self.retries = retries
        self.latents = latents
        self._latents_checked = False
        self.autoencoder = autoencoder
        self.caption_json_key = caption_json_key
        self.text_embeddings = text_embeddings  # None: read them when the latent shards have them
        self.text_embeddings_info: dict[str, Any] | None = None  # latents.json of the train shards, when read
        self.empty_context: torch.Tensor | None = None  # their stored empty-prompt embedding (T x D float16)
        self.buckets_spec = buckets
        self.buckets: list[Bucket] | None = None  # resolved by _check_values (latent shards: from latents.json)
        self.latent_factor: int | None = None
        self.consumed_log = consumed_log
        self._resume_state: dict[str, Any] | None = None
        self._progress_start: int | None = None  # Lightning batch index the resumed epoch starts at
        self._starts: tuple[int, dict[int, tuple[int, int]]] | None = None  # (epoch, {consumer: (cursor, batches)})
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
        if self.prefetch_factor is not None and (not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1):
            raise ValueError(f"data.prefetch_factor must be null or an integer >= 1, got {self.prefetch_factor!r}")
        caption_keys(self.caption_key)
        if self.caption_json_key is not None and not (isinstance(self.caption_json_key, str) and self.caption_json_key):
            raise ValueError(f"data.caption_json_key must be null or a key of the samples' .json, "
                             f"got {self.caption_json_key!r}")
        if self.text_embeddings not in (None, True, False):
            raise ValueError(f"data.text_embeddings must be null, true or false, got {self.text_embeddings!r}")
        if self.text_embeddings and not self.latents:
            raise ValueError("data.text_embeddings=true needs data.latents=true (data=latents): text embeddings "
                             "are stored with the latents by python -m ldm.data.latents --text-encoder")
        if self.mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "finite" and (self.epoch_length is not None or self.epoch_samples is not None):
            raise ValueError("data.epoch_length/epoch_samples apply to data.mode=resampled; a finite epoch is one pass")
        if self.epoch_length is not None and self.epoch_samples is not None:
            raise ValueError("set data.epoch_length (batches per rank) or data.epoch_samples (all ranks), not both")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise ValueError(f"data.epoch_samples must be a positive integer or None, got {self.epoch_samples!r}")
        # crop, flip_p and background are checked where they are used, by the decoder's options
        DecodeOptions(resolution=self.resolution, crop=self.crop, flip_p=self.flip_p, background=self.background)
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction!r}")
        if self.min_size < 0 or self.retries < 0:
            raise ValueError("data.min_size and data.retries must be >= 0")
        self.buckets = parse_buckets(self.buckets_spec, self.resolution)

    def check_shards(self) -> None:
        """Every local shard named exists: a typo stops start-up, naming the key, not a loader worker mid-epoch."""
        for key, spec in (("train_shards", self.train_shards), ("val_shards", self.val_shards)):
            if spec is None:
                continue
            try:
                expand_sources(spec) if key == "train_shards" else expand_shards(spec)
            except (OSError, ValueError) as err:
                raise ValueError(f"data.{key}={spec!r}: {err}") from None

    def check_latent_shards(self) -> None:
        """Latent shards must come from this run's autoencoder (by hash); checked once, at start-up if asked.

        Also settles data.text_embeddings (null: true when the shards hold them); every source must then hold
        embeddings of one and the same text tower."""
        if self._latents_checked:
            return
        sources = [source for source, _ in (expand_sources(self.train_shards) if self.train_shards is not None else [])]
        if self.val_shards is not None:
            sources.append(expand_shards(self.val_shards))
        infos = [check_latents(source, self.autoencoder) for source in sources]
        stored = [has_text_embeddings(info) for info in infos]
        if self.text_embeddings is None:  # null: as the (first) training shards say
            self.text_embeddings = bool(stored) and stored[0]
        if self.text_embeddings:
            if not all(stored):
                raise ValueError("data.text_embeddings: some of the latent shards (train or val) hold no text "
                                 "embeddings; encode them all with python -m ldm.data.latents --text-encoder, or "
                                 "set data.text_embeddings=false")
            towers = {info["text_encoder_sha256"] for info in infos}
            if len(towers) > 1:
                raise ValueError("data.text_embeddings: the train and val latent shards hold embeddings of different "
                                 "text towers; re-encode them with one")
            self.text_embeddings_info = infos[0]
            self.empty_context = load_empty_context(latents_folder(sources[0]))
        self._latents_checked = True

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
            sources = expand_sources(self.train_shards)
            urls = [url for source, _ in sources for url in source]
            if self.latents:
                self.check_latent_shards()
                self._latent_buckets(urls)
            counts, epoch_length = None, self.epoch_length
            if self.mode == "finite" and len({weight for _, weight in sources}) > 1:
                raise ValueError("data.train_shards weights apply to data.mode=resampled; "
                                 "a finite epoch reads every shard once")
            if self.mode == "finite":
                counts = shard_counts(urls, self.index_file)
            elif epoch_length is None and self.epoch_samples is not None:
                epoch_length = max(1, self.epoch_samples // (world_size * self.batch_size))
            elif epoch_length is None:
                total = count_samples(urls)
                if total is None:
                    raise ValueError(
                        "data.epoch_length is required: the number of training samples is unknown "
                        "(no info.json or *_stats.json next to the shards); or use data.mode=finite, "
                        "which counts them once"
                    )
                epoch_length = max(1, total // (world_size * self.batch_size))
            self.train_set = TrainStream(
                urls,
                resolution=self.resolution,
                batch_size=self.batch_size,
                mode=self.mode,
                epoch_length=epoch_length,
                counts=counts,
                rank=rank,
                world_size=world_size,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
                caption_key=self.caption_key,
                crop=self.crop,
                flip_p=self.flip_p,
                background=self.background,
                min_size=self.min_size,
                retries=self.retries,
                latents=self.latents,
                sources=[len(source) for source, _ in sources],
                weights=[weight for _, weight in sources],
                caption_json_key=self.caption_json_key,
                text_embeddings=bool(self.text_embeddings),
                buckets=self.buckets,
                latent_factor=self.latent_factor,
            )
            self._add_stats_callback()
        if stage in (None, "fit", "validate") and self.val_shards is not None:
            val_urls = expand_shards(self.val_shards)
            if self.latents:
                self.check_latent_shards()
                self._latent_buckets(val_urls)
            self.val_set = ValStream(
                val_urls,
                resolution=self.resolution,
                batch_size=self.val_batch_size,
                rank=rank,
                world_size=world_size,
                caption_key=self.caption_key,
                background=self.background,
                min_size=self.min_size,
                retries=self.retries,
                latents=self.latents,
                caption_json_key=self.caption_json_key,
                text_embeddings=bool(self.text_embeddings),
                buckets=self.buckets,
                latent_factor=self.latent_factor,
            )

    def bucket_list(self) -> list[Bucket] | None:
        """The aspect buckets training will use (latent shards: those of their latents.json), None if square."""
        if self.latents and self.train_shards is not None:
            self._latent_buckets([url for source, _ in expand_sources(self.train_shards) for url in source])
        return self.buckets

    def _latent_buckets(self, urls: list[str]) -> None:
        """Latent shards written with buckets train bucketed, on the buckets they were written with."""
        info = latents_info(urls)
        written = [tuple(b) for b in info["buckets"]] if info.get("buckets") else None
        if written is None:
            if self.buckets is not None:
                raise ValueError("data.buckets is set but these latent shards were written without buckets "
                                 "(latents.json has none): set data.buckets=null or re-encode with --buckets")
            return
        if self.buckets_spec is not None and sorted(self.buckets or []) != sorted(written):
            raise ValueError(f"data.buckets={self.buckets_spec!r} differs from the buckets the latent shards were "
                             f"written with ({written}): set data.buckets=null to use theirs")
        self.buckets = sorted(written, key=lambda b: b[0] / b[1])
        self.latent_factor = int(info["latent_factor"])

    def _loader(self, dataset: Any) -> DataLoader:
        workers = self.num_workers > 0
        return DataLoader(
            dataset,
            batch_size=None,  # the streams batch themselves
            num_workers=self.num_workers,
            persistent_workers=workers,
            # batches each worker keeps ready; torch refuses the argument without workers
            prefetch_factor=(self.prefetch_factor or 2) if workers else None,
            pin_memory=torch.cuda.is_available(),
            # SLURM signals every process of a job step: workers must leave USR1/SIGTERM to the trainer
            worker_init_fn=ignore_job_signals if workers else None,
        )

    def _add_stats_callback(self) -> None:
        """Give the trainer a DataStatsCallback (before the checkpoint callbacks) and a ConsumedCallback (first)."""
        trainer = self.trainer
        if trainer is None:
            return
        if not any(isinstance(c, ConsumedCallback) for c in trainer.callbacks):
            # first: every other callback that saves at a batch end must see this batch's position recorded
            trainer.callbacks.insert(0, ConsumedCallback(self.consumed_log))
        if any(isinstance(c, DataStatsCallback) for c in trainer.callbacks):
            return
        position = next((i for i, c in enumerate(trainer.callbacks)
                         if isinstance(c, pl.callbacks.Checkpoint)), len(trainer.callbacks))
        names = [bucket_name(b) for b in self.buckets] if self.buckets else []
        trainer.callbacks.insert(position, DataStatsCallback(max_skip_fraction=self.max_skip_fraction,
                                                             buckets=names))

    def _layout(self) -> resume.Layout:
        _, world_size = self._rank_world()
        return resume.Layout(world_size=world_size, num_workers=self.num_workers, batch_size=self.batch_size,
                             shuffle_buffer=self.shuffle_buffer)

    def _resume_key(self) -> dict[str, Any]:
        """What must be unchanged for a saved mid-epoch position to mean the same samples on the same layout."""
        return {"mode": self.mode, "seed": self.seed, **self._layout().as_dict(),
                "buckets": [list(b) for b in self.buckets] if self.buckets else None}

    def start_positions(self, epoch: int) -> dict[int, list[Any]]:
        """[cursor, batches, held] each consumer of this rank starts epoch `epoch` at (ConsumedCallback's reset)."""
        rank, _ = self._rank_world()
        workers = self._layout().workers
        starts = self._starts[1] if self._starts is not None and self._starts[0] == epoch else {}
        return {c: [*starts.get(c, (0, 0)), []] for c in range(rank * workers, (rank + 1) * workers)}

    def _consumed(self) -> ConsumedCallback | None:
        trainer = self.trainer
        return next((c for c in trainer.callbacks if isinstance(c, ConsumedCallback)), None) if trainer else None

    def _gather(self, local: dict[int, list[Any]]) -> dict[int, list[Any]]:
        """Every rank's consumer positions, on every rank: one padded all_gather of int64 on the root device."""
        flat: list[int] = []
        for c, (cursor, batches, held) in sorted(local.items()):
            flat += [c, cursor, batches, len(held), *held]
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            strategy = trainer.strategy
            device = strategy.root_device
            sizes = strategy.all_gather(torch.tensor([len(flat)], dtype=torch.int64, device=device)).reshape(-1)
            size = int(sizes.max())  # checkpoint time, not the training step
            padded = torch.full((size,), -1, dtype=torch.int64, device=device)
            padded[: len(flat)] = torch.tensor(flat, dtype=torch.int64, device=device)
            rows = strategy.all_gather(padded).reshape(len(sizes), size).cpu().tolist()
            flat = [v for row, n in zip(rows, sizes.cpu().tolist(), strict=True) for v in row[:n]]
        out: dict[int, list[Any]] = {}
        i = 0
        while i < len(flat):
            c, cursor, batches, n = flat[i : i + 4]
            out[c] = [cursor, batches, flat[i + 4 : i + 4 + n]]
            i += 4 + n
        return out

    def state_dict(self) -> dict[str, Any]:
        """The training position, saved in checkpoints: on every rank at the same step (it gathers).

        epoch and batches (Lightning's count this epoch), the layout, and in finite mode the
        epoch's plan (runs of global positions), its batches per rank and every consumer's
        cursor, trained batches and held positions.
        """
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        epoch = self.trainer.current_epoch
        state: dict[str, Any] = {"epoch": epoch, "batches": progress.processed, **self._resume_key()}
        consumed, train_set = self._consumed(), self.train_set
        if consumed is None or train_set is None:
            return state
        positions = self._gather(consumed.positions)
        count = self._layout().consumers
        state["num_batches"] = len(train_set)
        state["cursors"] = [positions.get(c, [0, 0, []])[0] for c in range(count)]
        state["consumed_batches"] = [positions.get(c, [0, 0, []])[1] for c in range(count)]
        state["held"] = [positions.get(c, [0, 0, []])[2] for c in range(count)]
        if self.mode == "finite":
            plan, per_rank = train_set.epoch_plan(epoch)
            state["plan"], state["plan_batches"] = resume.runs_tensor(plan), per_rank
        else:
            state["plan_batches"] = train_set.batches_per_rank(epoch)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the saved position; train_dataloader() makes the stream go on from it."""
        self._resume_state = dict(state_dict) if state_dict else None

    def align_progress(self) -> None:
        """Make Lightning's restored batch count end the resumed epoch after exactly the batches it has left.

        Lightning counts the interrupted epoch in the old layout's batches and ends it when that count
        reaches len(loader); the new layout has its own length and remainder, so the count moves to
        len(loader) - remaining (ConsumedCallback calls this in on_train_start, after loops are restored).
        """
        if self._progress_start is None or self.trainer is None:
            return
        current = self.trainer.fit_loop.epoch_loop.batch_progress.current
        shift = self._progress_start - current.processed
        current.ready += shift
        current.started += shift
        current.processed += shift
        current.completed += shift
        self._progress_start = None

    def _plan_resume(self, state: dict[str, Any]) -> None:
        """Set up the stream (and the Lightning count) to go on from a saved mid-epoch position."""
        train_set = self.train_set
        assert train_set is not None and self.trainer is not None
        epoch = self.trainer.current_epoch
        num_batches = int(state.get("num_batches", len(train_set)))
        if state.get("epoch") != epoch or not 0 < state["batches"] < num_batches:
            return  # saved at an epoch's end: the next one starts fresh
        rank, _ = self._rank_world()
        same = {k: state.get(k) for k in self._resume_key()} == self._resume_key()
        if state.get("mode") != self.mode or state.get("seed") != self.seed or (
                "cursors" not in state and not same):
            log.warning("data settings changed since the checkpoint (%s -> %s): the interrupted "
                        "epoch restarts from its beginning", {k: state.get(k) for k in self._resume_key()},
                        self._resume_key())
            return
        if "cursors" not in state:  # a checkpoint from before positions were saved
            train_set.resume_at(state["epoch"], state["batches"])
            return
        held = [list(h) for h in state["held"]]
        if same and not any(held):  # every consumer skips its cursor, undecoded, and goes on
            plan = resume.tensor_runs(state["plan"]) if "plan" in state else None
            starts = {c: (int(cur), int(done)) for c, (cur, done)
                      in enumerate(zip(state["cursors"], state["consumed_batches"], strict=True))}
            self._continue(epoch, plan, int(state["plan_batches"]), starts, num_batches - state["batches"])
            return
        new = self._layout()
        if self.mode == "resampled":
            left = len(train_set) - round(state["batches"] / num_batches * len(train_set))
            self._continue(epoch, None, left, {}, left)
            if rank == 0:
                log.info("data.mode=resampled, resumed on another layout: the rest of epoch %d (%d batches per "
                         "rank) comes from fresh streams of the new layout", epoch, left)
            return
        old = resume.Layout(world_size=state["world_size"], num_workers=state["num_workers"],
                            batch_size=state["batch_size"], shuffle_buffer=state["shuffle_buffer"])

        def order(c: int, positions: list[int]) -> list[int]:
            rng = resume.shuffle_rng(self.seed, epoch, c, old.consumers)
            return list(shuffled(positions, old.shuffle_buffer, rng))

        left = resume.pending(resume.tensor_runs(state["plan"]), int(state["plan_batches"]), old,
                              [int(c) for c in state["cursors"]], held, order)
        plan, per_rank, dropped = resume.replan(left, new)
        self._continue(epoch, plan, per_rank, {}, per_rank)
        if rank == 0:
            log.info("resumed epoch %d on %d rank(s) x %d worker(s), batch %d (saved on %d x %d, batch %d): "
                     "%d samples of it left, %d batches per rank, %d dropped (fewer than one global batch)",
                     epoch, new.world_size, new.workers, new.batch_size, old.world_size, old.workers,
                     old.batch_size, len(left), per_rank, dropped)

    def _continue(self, epoch: int, plan: resume.Runs | None, per_rank: int,
                  starts: dict[int, tuple[int, int]], remaining: int) -> None:
        assert self.train_set is not None
        self.train_set.continue_epoch(epoch, plan=plan, per_rank=per_rank, starts=starts)
        self._starts = (epoch, starts)
        self._progress_start = len(self.train_set) - remaining

    def train_dataloader(self) -> DataLoader:
        """Exactly len(train_set) batches per epoch on this rank, starting at the trainer's epoch."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        if self.trainer is not None:
            self.train_set.set_epoch(self.trainer.current_epoch)
            if self.mode == "resampled" and self.trainer.global_rank == 0:
                log.info("data.mode=resampled draws samples with repeats, so an epoch does not use each sample "
                         "once; a mid-epoch resume on the same ranks, workers, batch size and buffer goes on "
                         "where every stream stopped, on another layout the rest of the epoch comes from fresh "
                         "streams of the new layout")
        if self._resume_state and self.trainer is not None:
            self._plan_resume(self._resume_state)
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader | list:
        """One ordered pass over this rank's part of the validation shards ([] when there are none)."""
        if self.val_set is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        return self._loader(self.val_set)
