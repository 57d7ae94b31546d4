"""Streams of (image, caption) batches over WebDataset shards, equal in length on every DDP rank.

Each stream is read by a number of *consumers*: every DataLoader worker of every
rank. An uneven batch count between ranks hangs DDP at the next collective, so
every consumer knows up front exactly how many batches it yields in an epoch:

- finite: one pass over the data per epoch. The shards, in an order reshuffled
  by (seed, epoch), are laid end to end; that sequence of samples is cut into
  `world_size * batch_size * B` leading samples (B = batches per rank), dealt in
  contiguous ranges to ranks and then workers. No sample is seen twice within an
  epoch, fewer than `world_size * batch_size` are left out, and which ones
  changes with the epoch. Needs the sample count of every shard.
- resampled: an endless stream per consumer (its shards in a fresh random order
  on every pass) cut into epochs of `epoch_length` batches per rank, for data
  too large to count or to finish.

Fewer shards than consumers works in both modes (consumers share shards by
sample ranges or strides). A stream is a function of (seed, epoch, rank,
worker), so a restart can skip what an interrupted epoch already consumed. A
finite sample carries `__pos__`, its position in the epoch's global order, and
every batch its consumer's `data_position` (cursor and held samples), from which
a checkpoint resumes the epoch on another layout (ldm.data.resume).
Samples that fail to decode are skipped and counted; in finite mode a short
part is padded with repeats of its last samples (counted too) so the batch
count never changes. Counts travel with each batch under "data_stats".
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.buckets import Bucket, Bucketer, bucket_name
from ldm.data.decode import STAT_KEYS, DecodeOptions, Filtered, decode_sample
from ldm.data.resume import (  # noqa: F401 (worker_share re-exported: tests import it from here)
    Runs,
    consumer_slice,
    shard_order,
    shard_pieces,
    shuffle_rng,
    take,
    worker_share,
)
from ldm.data.shards import (  # noqa: F401 (re-exported: the data module and tests import them from here)
    IMAGE_EXTENSIONS,
    Sample,
    ShardSpec,
    count_samples,
    expand_shards,
    expand_sources,
    read_samples,
    shard_counts,
)
from ldm.data.text_embeddings import collate_context

log = logging.getLogger(__name__)

MODES = ("finite", "resampled")


# ---------------------------------------------------------------------------------------------
# Who reads what


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader process we run in; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def consumer(rank: int, world_size: int) -> tuple[int, int]:
    """(index, count) of this reader among all DataLoader workers of all ranks."""
    worker, num_workers = worker_info()
    return rank * num_workers + worker, world_size * num_workers


def finite_batches(total_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per rank per epoch in finite mode: every rank the same, fewer than a global batch left out."""
    return total_samples // (world_size * batch_size)


def finite_parts(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
) -> list[tuple[int, int, int]]:
    """(shard index, start, stop) sample ranges that one consumer reads in one fresh finite epoch.

    Shards are laid end to end in an order drawn from (seed, epoch); rank r, worker w
    takes the contiguous range after the ranges of earlier ranks and workers. The
    ranges are disjoint and hold exactly worker_share(...) * batch_size samples.
    """
    per_rank = finite_batches(sum(counts), world_size, batch_size)
    start, stop = consumer_slice(per_rank, rank, worker, num_workers, batch_size)
    return [(shard, lo, hi) for shard, lo, hi, _ in
            shard_pieces([(start, stop)], counts, shard_order(len(counts), seed, epoch))]


def assign_shards(urls: Sequence[str], index: int, count: int) -> tuple[list[str], int, int]:
    """This consumer's shards and the sample stride/offset it keeps within each (resampled, validation).

    Enough shards: deal them round-robin, keep every sample. Too few: read all of
    them, keep sample i when i % count == index.
    """
    if len(urls) >= count:
        return list(urls[index::count]), 1, 0
    return list(urls), count, index


# ---------------------------------------------------------------------------------------------
# Batches


class Counters(dict):
    """Per-worker counts (see STAT_KEYS); `take()` hands over what accumulated since the last batch."""

    def __init__(self) -> None:
        super().__init__({key: 0 for key in STAT_KEYS})

    def take(self) -> dict[str, int]:
        taken = dict(self)
        for key in self:
            self[key] = 0
        return taken


def collate(samples: list[dict[str, Any]], stats: dict[str, int] | None = None) -> dict[str, Any]:
    """Decoded samples -> {"image": Bx3xRxR, "caption": [str], "key": [str], "data_stats": {name: int}}.

    Latent shards give "moments" (Bx2Cxhxw) in place of "image". Any other key the samples share is kept:
    "context" (stored text embeddings, see ldm.data.text_embeddings.collate_context), tensors of one shape
    stacked (e.g. bucketed "crop_top_left", "original_size"), the rest as lists (e.g. "captions", each
    sample's list of captions). Keys starting with "__" (raw-sample bookkeeping) are not batched.
    """
    field = "image" if "image" in samples[0] else "moments"
    batch = {
        field: torch.stack([s[field] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "data_stats": stats if stats is not None else {key: 0 for key in STAT_KEYS},
    }
    for name in samples[0]:
        if name in batch or name.startswith("__") or not all(name in s for s in samples):
            continue
        values = [s[name] for s in samples]
        if name == "context":
            batch.update(collate_context(values))
        elif all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values):
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    return batch


def shuffled(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Sample-level shuffle buffer over raw (still encoded, so small) samples."""
    if size <= 1:
        yield from samples
        return
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


class _Decoder:
    """Decode with counting; loud when nothing at all decodes instead of spinning forever."""

    def __init__(self, options: DecodeOptions, stats: Counters, seed: str | None) -> None:
        self.options = options
        self.stats = stats
        self.seed = seed  # per-sample crop/flip randomness, so a resumed epoch crops alike
        self.decoded = 0
        self.skipped = 0

    def __call__(self, sample: Sample, size: tuple[int, int] | None = None) -> dict[str, Any] | None:
        """The decoded example (cropped to `size`, an aspect bucket, when given), or None if unusable."""
        self.stats["samples"] += 1
        rng = random.Random(f"{self.seed}:{sample.get('__key__')}") if self.seed is not None else None
        try:
            result = decode_sample(sample, self.options, self.stats, rng, size)
        except Filtered:
            self.stats["filtered"] += 1
            return None
        except Exception as exn:  # any undecodable payload: skip it, count it, say so (rate-limited)
            self.stats["skipped"] += 1
            self.skipped += 1
            skipped = self.skipped
            if skipped <= 10 or skipped % 1000 == 0:
                log.warning("skipped sample %s of %s (%d so far in this worker): %r",
                            sample.get("__key__"), sample.get("__url__"), skipped, exn)
            if self.decoded == 0 and skipped >= 100:
                raise RuntimeError(f"the first {skipped} samples all failed to decode") from exn
            return None
        self.decoded += 1
        return result


def _blank(options: DecodeOptions) -> dict[str, Any]:
    return {"image": torch.zeros(3, options.resolution, options.resolution), "caption": "", "key": ""}


def make_batches(
    raw: Iterable[Sample],
    decoder: _Decoder,
    *,
    batch_size: int,
    num_batches: int,
    pad: bool,
    bucketer: Bucketer | None = None,
    skip: int = 0,
) -> Iterator[dict[str, Any]]:
    """Exactly `num_batches` full batches from raw samples (padding with repeats if `pad`, else an error).

    With a `bucketer`, each batch holds one aspect bucket, and the first `skip` batches
    are formed (without decoding) and dropped: a resumed epoch rebuilds the queues it had.
    """
    if bucketer is not None:
        yield from bucket_batches(raw, decoder, bucketer, num_batches=num_batches, pad=pad, skip=skip)
        return
    stats = decoder.stats
    batch: list[dict[str, Any]] = []
    recent: deque[dict[str, Any]] = deque(maxlen=batch_size)
    produced = 0
    if num_batches <= 0:
        return
    for sample in raw:
        example = decoder(sample)
        if example is None:
            continue
        batch.append(example)
        recent.append(example)
        if len(batch) == batch_size:
            yield collate(batch, _public(stats.take()))
            batch = []
            produced += 1
            if produced == num_batches:
                return
    if not pad:
        raise RuntimeError("the sample stream ended early (no shard gave a sample)")
    if not recent and decoder.options.latents:
        raise RuntimeError("no latent sample of this worker's part could be read; cannot pad its batches")
    fill = list(recent) or [_blank(decoder.options)]
    i = 0
    while produced < num_batches:
        batch.append(fill[i % len(fill)])
        stats["padded"] += 1
        i += 1
        if len(batch) == batch_size:
            yield collate(batch, _public(stats.take()))
            batch = []
            produced += 1


def _public(stats: dict[str, int]) -> dict[str, int]:
    return {key: stats[key] for key in STAT_KEYS}


class _BucketDecoder:
    """Decodes a formed bucket batch; a sample that fails is replaced by a repeat from the same bucket."""

    def __init__(self, decoder: _Decoder, bucketer: Bucketer) -> None:
        self.decoder = decoder
        self.bucketer = bucketer
        self.last: dict[int, dict[str, Any]] = {}  # a good example per bucket, for a batch that all fails

    def __call__(self, bucket: int, samples: list[Sample]) -> dict[str, Any]:
        """A full batch from `samples` (a full or, at the end of a part, a partial queue), padded by repeats."""
        stats = self.decoder.stats
        size = self.bucketer.buckets[bucket]
        examples: list[dict[str, Any] | None] = [self.decoder(s, size) for s in samples]
        good = [e for e in examples if e is not None]
        if not good:
            good = [self.last.get(bucket) or self._blank(size)]
        self.last[bucket] = good[-1]
        filled = [e for e in examples if e is not None]
        while len(filled) < self.bucketer.batch_size:  # failed decodes and a partial queue's gap
            filled.append(good[len(filled) % len(good)])
            stats["padded"] += 1
        batch = collate(filled, _public(stats.take()))
        batch["data_stats"][bucket_name(size)] = len(filled)
        return batch

    def _blank(self, size: tuple[int, int]) -> dict[str, Any]:
        if self.decoder.options.latents:
            raise RuntimeError("no latent sample of a bucket batch could be read; cannot pad it")
        return {"image": torch.zeros(3, *size), "caption": "", "key": "",
                "crop_top_left": torch.zeros(2, dtype=torch.long),
                "original_size": torch.tensor(size, dtype=torch.long)}


def bucket_batches(
    raw: Iterable[Sample], decoder: _Decoder, bucketer: Bucketer, *, num_batches: int, pad: bool, skip: int = 0
) -> Iterator[dict[str, Any]]:
    """`num_batches` one-bucket batches after `skip` already consumed ones (see ldm.data.buckets).

    Skipped batches are formed from the raw stream without decoding, so the bucket
    queues after the skip are exactly those of the interrupted run.
    """
    stats = decoder.stats
    decode = _BucketDecoder(decoder, bucketer)
    formed, produced = 0, 0
    previous: tuple[int, list[Sample]] | None = None
    if num_batches <= 0:
        return

    def bad(sample: Sample) -> None:  # no readable size: undecodable, skipped and counted like a failed decode
        if formed >= skip:
            stats["samples"] += 1
            stats["skipped"] += 1
            log.warning("skipped sample %s of %s: its image size cannot be read",
                        sample.get("__key__"), sample.get("__url__"))

    for bucket, samples in bucketer.batches(raw, bad):
        formed += 1
        previous = (bucket, samples)
        if formed <= skip:
            continue
        yield _with_held(decode(bucket, samples), bucketer)
        produced += 1
        if produced == num_batches:
            return
    if not pad:
        raise RuntimeError("the sample stream ended early (no shard gave a sample)")
    missing = skip + num_batches - formed  # what the full part still owes, counted from the epoch's start
    leftovers, dropped = bucketer.leftovers(missing)
    for index in range(missing):
        if index < len(leftovers):
            bucket, samples = leftovers[index]
            previous = (bucket, samples)
        else:  # samples lost before bucketing (unreadable sizes): repeat the last batch formed
            if previous is None:
                raise RuntimeError("no sample of this worker's part could be placed in a bucket; cannot pad")
            bucket, samples = previous
        if index == 0 and skip <= formed:
            stats["dropped"] += dropped
        if formed + index < skip:
            continue
        yield _with_held(decode(bucket, samples), bucketer)
        produced += 1
        if produced == num_batches:
            return


def _with_held(batch: dict[str, Any], bucketer: Bucketer) -> dict[str, Any]:
    """The samples still queued in the buckets: pulled, not yet batched (the data position's "held")."""
    batch["data_position"] = {"held": bucketer.held()}
    return batch


# ---------------------------------------------------------------------------------------------
# Datasets


class TrainStream(IterableDataset):
    """Shuffled training batches, exactly `len(self)` per epoch on this rank whatever the worker count.

    The epoch reaches the workers even when they persist across epochs: each
    `iter()` in a process counts one epoch on from the last `set_epoch` (the
    DataLoader calls `iter(dataset)` in every worker once per epoch).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        resolution: int,
        batch_size: int,
        mode: str = "resampled",
        epoch_length: int | None = None,
        counts: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        caption_key: str | Sequence[str] = "txt",
        crop: str = "center",
        flip_p: float = 0.0,
        background: Sequence[int] = (255, 255, 255),
        min_size: int = 0,
        retries: int = 2,
        latents: bool = False,
        sources: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        caption_json_key: str | None = None,
        text_embeddings: bool = False,
        buckets: Sequence[Bucket] | None = None,
        latent_factor: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.urls = list(urls)
        self.mode = mode
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.retries = retries
        self.options = DecodeOptions(resolution=resolution, caption_key=caption_key, crop=crop,
                                     flip_p=flip_p, background=tuple(background), min_size=min_size,
                                     latents=latents, caption_json_key=caption_json_key,
                                     text_embeddings=text_embeddings, bucketed=buckets is not None)
        # aspect buckets (ldm.data.buckets); latent shards are grouped by their stored shape
        self.buckets = [tuple(b) for b in buckets] if buckets is not None else None
        self.latent_factor = latent_factor
        # resampled mode may mix sources: the first sources[0] URLs are source 0, and so on
        self.sources = list(sources) if sources is not None else [len(self.urls)]
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(self.sources)
        if sum(self.sources) != len(self.urls) or len(self.weights) != len(self.sources):
            raise ValueError("sources must split the URLs and have one weight each")
        if mode == "finite" and len(set(self.weights)) > 1:
            raise ValueError("source weights apply to data.mode=resampled; a finite epoch reads every shard once")
        if mode == "finite":
            if counts is None or len(counts) != len(self.urls):
                raise ValueError("finite mode needs the sample count of every shard")
            self.counts = [int(c) for c in counts]
            self.num_batches = finite_batches(sum(self.counts), world_size, batch_size)
            if self.num_batches < 1:
                raise ValueError(
                    f"{sum(self.counts)} training samples are fewer than world_size * batch_size = "
                    f"{world_size} * {batch_size}: lower data.batch_size or add data"
                )
        else:
            if epoch_length is None or epoch_length < 1:
                raise ValueError(f"resampled mode needs epoch_length >= 1 batches, got {epoch_length!r}")
            self.counts = list(counts) if counts is not None else []
            self.num_batches = int(epoch_length)
        self.epoch = 0
        self._iterations = 0
        self._resume: tuple[int, int] | None = None
        # a resumed epoch: {"epoch", "plan": runs, "per_rank": batches, "starts": {consumer: (cursor, batches)}}
        self._continue: dict[str, Any] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """The next `iter()` in this process (or in workers started from it) yields epoch `epoch`."""
        self.epoch = int(epoch)
        self._iterations = 0

    def resume_at(self, epoch: int, batches: int) -> None:
        """Epoch `epoch` yields only what follows its first `batches` batches on this rank."""
        self._resume = (int(epoch), int(batches))

    def continue_epoch(self, epoch: int, *, plan: Runs | None, per_rank: int,
                       starts: dict[int, tuple[int, int]]) -> None:
        """Epoch `epoch` deals `per_rank` batches per rank from `plan` (None: the fresh plan).

        starts[consumer] = (cursor, batches): raw samples it skips undecoded and batches it no longer yields.
        """
        self._continue = {"epoch": int(epoch), "plan": plan, "per_rank": int(per_rank), "starts": dict(starts)}

    def epoch_plan(self, epoch: int) -> tuple[Runs, int]:
        """(plan runs, batches per rank dealt from it) of epoch `epoch` (finite mode)."""
        if self._continue is not None and self._continue["epoch"] == epoch and self._continue["plan"] is not None:
            return self._continue["plan"], self._continue["per_rank"]
        return [(0, sum(self.counts))], self.num_batches

    def batches_per_rank(self, epoch: int) -> int:
        """Batches each rank yields in epoch `epoch` counted from its start (a resumed one may have fewer)."""
        if self._continue is not None and self._continue["epoch"] == epoch:
            return self._continue["per_rank"]
        return self.num_batches

    def _start(self, epoch: int, index: int, worker: int, num_workers: int) -> tuple[int, int, int]:
        """(batches per rank this epoch, raw samples to skip, batches already delivered) for one consumer."""
        if self._continue is not None and self._continue["epoch"] == epoch:
            cursor, done = self._continue["starts"].get(index, (0, 0))
            return self._continue["per_rank"], cursor, done
        skip = self._skip(epoch, worker, num_workers)
        return self.num_batches, skip * self.batch_size, skip

    def _skip(self, epoch: int, worker: int, num_workers: int) -> int:
        """Batches this worker already delivered in an interrupted epoch (batch j came from worker j % W)."""
        if self._resume is None or self._resume[0] != epoch:
            return 0
        consumed = min(self._resume[1], self.num_batches)
        return consumed // num_workers + (worker < consumed % num_workers)

    def _finite_raw(self, epoch: int, worker: int, num_workers: int, stats: Counters) -> Iterator[Sample]:
        """This consumer's slice of the epoch's plan, in position order, each sample tagged with its __pos__."""
        plan, per_rank = self.epoch_plan(epoch)
        start, stop = consumer_slice(per_rank, self.rank, worker, num_workers, self.batch_size)
        pieces = shard_pieces(take(plan, start, stop), self.counts, shard_order(len(self.counts), self.seed, epoch))
        keep = self.options.keeps()
        i = 0
        while i < len(pieces):  # one read per shard, keeping only the planned ranges of it
            j = i
            while j + 1 < len(pieces) and pieces[j + 1][0] == pieces[i][0]:
                j += 1
            shard, group = pieces[i][0], pieces[i : j + 1]
            base = group[0][3] - group[0][1]  # position of the shard's sample 0
            wanted = [(lo, hi) for _, lo, hi, _ in group]

            def record(url: str, position: int, exn: Exception, wanted: list[tuple[int, int]] = wanted) -> None:
                lost = sum(max(0, hi - max(lo, position)) for lo, hi in wanted)
                stats["failed_shards"] += 1
                stats["samples"] += lost
                stats["skipped"] += lost

            samples = read_samples(self.urls[shard], keep, start=wanted[0][0], stop=wanted[-1][1],
                                   retries=self.retries, on_failure=record)
            r = 0
            for index, sample in enumerate(samples, start=wanted[0][0]):
                while index >= wanted[r][1]:
                    r += 1
                if index >= wanted[r][0]:
                    sample["__pos__"] = base + index
                    yield sample
            i = j + 1

    def _raw(self, epoch: int, worker: int, num_workers: int, stats: Counters) -> Iterator[Sample]:
        if self.mode == "finite":
            return self._finite_raw(epoch, worker, num_workers, stats)
        keep = self.options.keeps()
        index, count = self.rank * num_workers + worker, self.world_size * num_workers

        def failed(url: str, position: int, exn: Exception) -> None:
            stats["failed_shards"] += 1

        def endless(urls: list[str], rng: random.Random) -> Iterator[Sample]:
            urls, stride, offset = assign_shards(urls, index, count)
            while True:
                order = list(urls)
                rng.shuffle(order)
                yielded = 0
                for url in order:
                    for sample in read_samples(url, keep, stride=stride, offset=offset,
                                               retries=self.retries, on_failure=failed):
                        yielded += 1
                        yield sample
                if yielded == 0:
                    raise RuntimeError(f"a full pass over {len(order)} shards gave no samples (first: {order[0]})")

        streams, start = [], 0
        for s, size in enumerate(self.sources):
            rng = random.Random(f"passes:{self.seed}:{epoch}:{index}:{count}:{s}")
            streams.append(endless(self.urls[start : start + size], rng))
            start += size
        if len(streams) == 1:
            return streams[0]
        pick = random.Random(f"mix:{self.seed}:{epoch}:{index}:{count}")

        def mixed() -> Iterator[Sample]:  # each sample from a source drawn by weight
            while True:
                yield next(streams[pick.choices(range(len(streams)), self.weights)[0]])

        return mixed()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        epoch = self.epoch + self._iterations
        self._iterations += 1
        index = self.rank * num_workers + worker
        per_rank, skip, done = self._start(epoch, index, worker, num_workers)
        share = worker_share(per_rank, worker, num_workers)
        stats = Counters()
        rng = shuffle_rng(self.seed, epoch, index, self.world_size * num_workers)
        raw = _Pulled(shuffled(self._raw(epoch, worker, num_workers, stats), self.shuffle_buffer, rng))
        bucketer = self.bucketer()
        # resume: drop what was consumed, undecoded; bucketed streams re-form their delivered batches instead,
        # so that the bucket queues come back as they were (the plan, and so the stream, is the same)
        for _ in range(0 if bucketer else skip):
            if next(raw, None) is None:
                break
        random_aug = self.options.crop == "random" or self.options.flip_p > 0
        decoder = _Decoder(self.options, stats, f"{self.seed}:{epoch}" if random_aug else None)
        for batch in make_batches(raw, decoder, batch_size=self.batch_size, num_batches=share - done,
                                  pad=self.mode == "finite", bucketer=bucketer, skip=done if bucketer else 0):
            # read while the batcher waits at its yield: exactly what it has pulled for the batches so far
            held = batch.get("data_position", {}).get("held", [])
            batch["data_position"] = {"consumer": index, "cursor": raw.pulled, "held": list(held)}
            yield batch

    def bucketer(self) -> Bucketer | None:
        """Fresh bucket queues for one epoch of one worker (None when unbucketed)."""
        if self.buckets is None:
            return None
        return Bucketer(self.buckets, self.batch_size, self.latent_factor)


class _Pulled(Iterator[Sample]):
    """Counts the samples taken out of the shuffle buffer: the consumer's cursor in its epoch."""

    def __init__(self, samples: Iterator[Sample]) -> None:
        self.samples = samples
        self.pulled = 0

    def __next__(self) -> Sample:
        sample = next(self.samples)
        self.pulled += 1
        return sample


class ValStream(IterableDataset):
    """One ordered pass over this rank's part of the shards, in batches (the last ones partial).

    Ranks read disjoint parts that together cover every sample once, but their
    batch counts can differ by a few when shards or samples don't divide evenly.
    That is harmless as long as validation steps do no collectives (log with
    sync_dist only at epoch end).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        resolution: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        caption_key: str | Sequence[str] = "txt",
        background: Sequence[int] = (255, 255, 255),
        min_size: int = 0,
        retries: int = 2,
        latents: bool = False,
        caption_json_key: str | None = None,
        text_embeddings: bool = False,
        buckets: Sequence[Bucket] | None = None,
        latent_factor: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.retries = retries
        self.options = DecodeOptions(resolution=resolution, caption_key=caption_key,
                                     background=tuple(background), min_size=min_size, latents=latents,
                                     caption_json_key=caption_json_key, text_embeddings=text_embeddings,
                                     bucketed=buckets is not None)
        self.buckets = [tuple(b) for b in buckets] if buckets is not None else None
        self.latent_factor = latent_factor

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index, count = consumer(self.rank, self.world_size)
        urls, stride, offset = assign_shards(self.urls, index, count)
        stats = Counters()
        keep = self.options.keeps()
        decoder = _Decoder(self.options, stats, None)
        raw = chain.from_iterable(read_samples(url, keep, stride=stride, offset=offset, retries=self.retries)
                                  for url in urls)
        if self.buckets is not None:
            yield from self._bucketed(raw, decoder)
            return
        batch: list[dict[str, Any]] = []
        for url in urls:
            for sample in read_samples(url, keep, stride=stride, offset=offset, retries=self.retries):
                example = decoder(sample)
                if example is None:
                    continue
                batch.append(example)
                if len(batch) == self.batch_size:
                    yield collate(batch, _public(stats.take()))
                    batch = []
        if batch:
            yield collate(batch, _public(stats.take()))

    def _bucketed(self, raw: Iterable[Sample], decoder: _Decoder) -> Iterator[dict[str, Any]]:
        """Batches of one bucket each, in the order they fill; then every partial bucket, in bucket order."""
        bucketer = Bucketer(self.buckets or [], self.batch_size, self.latent_factor)

        def emit(bucket: int, samples: list[Sample]) -> dict[str, Any] | None:
            size = bucketer.buckets[bucket]
            examples = [e for e in (decoder(s, size) for s in samples) if e is not None]
            if not examples:
                return None
            batch = collate(examples, _public(decoder.stats.take()))
            batch["data_stats"][bucket_name(size)] = len(examples)
            return batch

        def bad(sample: Sample) -> None:
            decoder.stats["samples"] += 1
            decoder.stats["skipped"] += 1

        for bucket, samples in bucketer.batches(raw, bad):
            batch = emit(bucket, samples)
            if batch is not None:
                yield batch
        for bucket, samples in enumerate(bucketer.queues):
            batch = emit(bucket, samples) if samples else None
            if batch is not None:
                yield batch
