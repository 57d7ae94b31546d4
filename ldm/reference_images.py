"""The reference side of an evaluation: its images (FID's real statistics) and its captions (the prompts).

Both are read in shard order, so the reference set and the prompt of sample i depend on the data alone,
never on the number of ranks or loader workers that read it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from typing import Any

from torch.utils.data import IterableDataset

from ldm.data.captions import caption_keys, read_captions
from ldm.data.decode import STAT_KEYS, DecodeOptions, Filtered, decode_sample
from ldm.data.pipeline import assign_shards, collate, consumer
from ldm.data.shards import read_samples

log = logging.getLogger(__name__)


class ReferenceImages(IterableDataset):
    """Reference images in batches ({"image": Bx3xRxR in [-1, 1], "caption", "key"}), each read by exactly one
    consumer (a rank's loader worker).

    limit None: every image, the consumers splitting the shards as validation does. limit N: the first N
    samples in shard order, sample i to consumer i % consumers (each consumer streams those N samples' bytes
    and decodes only its own).
    """

    def __init__(self, urls: Sequence[str], *, resolution: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 limit: int | None = None, caption_key: str | Sequence[str] = "txt") -> None:
        super().__init__()
        self.urls = list(urls)
        self.options = DecodeOptions(resolution=resolution, caption_key=caption_key)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.limit = limit

    def _samples(self) -> Iterator[dict[str, Any]]:
        index, count = consumer(self.rank, self.world_size)
        keep = self.options.keeps()
        if self.limit is None:
            urls, stride, offset = assign_shards(self.urls, index, count)
            yield from chain.from_iterable(read_samples(u, keep, stride=stride, offset=offset) for u in urls)
            return
        first = islice(chain.from_iterable(read_samples(u, keep) for u in self.urls), self.limit)
        yield from (s for i, s in enumerate(first) if i % count == index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stats = dict.fromkeys(STAT_KEYS, 0)
        batch: list[dict[str, Any]] = []
        for sample in self._samples():
            try:
                batch.append(decode_sample(sample, self.options, stats))
            except Filtered:
                continue
            except Exception as exn:  # an undecodable image is left out of the reference, loudly
                log.warning("reference image %s of %s skipped: %r", sample.get("__key__"), sample.get("__url__"), exn)
                continue
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


def first_captions(urls: Sequence[str], count: int, caption_key: str | Sequence[str] = "txt") -> list[str]:
    """The first caption of each of the first `count` samples in shard order (only caption members are read)."""
    keys = caption_keys(caption_key)
    wanted = frozenset(keys).__contains__
    stats = dict.fromkeys(STAT_KEYS, 0)
    samples = islice(chain.from_iterable(read_samples(u, wanted) for u in urls), count)
    return [read_captions(s, keys, None, stats)[0] for s in samples]
