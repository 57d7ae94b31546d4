"""Aspect-ratio buckets: batches of one resolution each, so non-square images keep their whole frame.

A bucket is a (height, width) resolution. `data.buckets` is either a list of them or
`{step, max_ratio, area}`: every resolution whose sides are multiples of `step`,
whose pixel count is near `area` (default data.resolution ** 2) and whose long/short
side ratio is at most `max_ratio`. Each image goes to the bucket nearest its aspect
ratio (distance of log-ratios) before it is decoded: the size comes from the json
img2dataset writes (`width`/`height`), else from the image header (PIL opens lazily).
So bucket queues hold raw, still encoded samples; a batch is decoded when its bucket
fills.

Equal batch counts survive bucketing: in finite mode a consumer reads exactly
`share * batch_size` samples, and the partial buckets left when its part ends hold
`missing * batch_size` samples over queues shorter than a batch, so at least
`missing` queues are non-empty. The `missing` largest are padded with repeats from
their own bucket; the rest are dropped (both counted).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.shards import IMAGE_EXTENSIONS, Sample

Bucket = tuple[int, int]  # (height, width) in pixels
MOMENTS_MEMBER = "moments.npy"


def generate_buckets(area: int, step: int, max_ratio: float) -> list[Bucket]:
    """Resolutions with sides that are multiples of `step`, about `area` pixels, long/short side <= max_ratio.

    For every height (a multiple of step) the width is the multiple of step that brings
    the area nearest `area` without exceeding it by more than one step's worth, so buckets
    cost about the same memory and step time.
    """
    if step < 1 or area < step * step:
        raise ValueError(f"data.buckets: area {area} must be at least step**2 = {step * step}")
    if max_ratio < 1.0:
        raise ValueError(f"data.buckets.max_ratio must be >= 1, got {max_ratio}")
    found: set[Bucket] = set()
    height = step
    while height * step <= area:
        width = max(step, int(area / height) // step * step)
        if max(height / width, width / height) <= max_ratio + 1e-9:
            found.add((height, width))
        height += step
    if not found:
        raise ValueError(f"data.buckets: no resolution of area {area} with step {step} within ratio {max_ratio}")
    return sorted(found, key=lambda b: b[0] / b[1])


def parse_buckets(spec: Any, resolution: int) -> list[Bucket] | None:
    """The `data.buckets` value -> bucket list (sorted by height/width); None keeps square crops.

    Raises ValueError naming the key for anything else.
    """
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"step", "max_ratio", "area"})
        if unknown or "step" not in spec:
            raise ValueError(f"data.buckets: a mapping needs step (and optional max_ratio, area), got {dict(spec)}")
        area = int(spec.get("area") or resolution * resolution)
        return generate_buckets(area, int(spec["step"]), float(spec.get("max_ratio", 2.0)))
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"data.buckets must be null, a list of [height, width] or {{step, max_ratio, area}}, "
                         f"got {spec!r}")
    buckets = []
    for item in spec:
        if (not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in item)):
            raise ValueError(f"data.buckets: each bucket is [height, width] in positive pixels, got {item!r}")
        buckets.append((int(item[0]), int(item[1])))
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"data.buckets lists a resolution twice: {spec!r}")
    return sorted(buckets, key=lambda b: b[0] / b[1])


def check_bucket_factor(buckets: Sequence[Bucket] | None, factor: int, what: str) -> None:
    """Every bucket side must be a multiple of `factor` (autoencoder factor times UNet downsampling)."""
    for height, width in buckets or ():
        if height % factor or width % factor:
            raise ValueError(f"data.buckets: {height}x{width} is not a multiple of {factor} ({what}); "
                             f"use a step that is a multiple of {factor}")


def bucket_name(bucket: Bucket) -> str:
    return f"bucket_{bucket[0]}x{bucket[1]}"


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is nearest width/height, by |log ratio difference|."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(ratio - math.log(buckets[i][1] / buckets[i][0])), i))


def probe_size(sample: Sample) -> tuple[int, int] | None:
    """(width, height) of a raw sample's image without decoding it: json width/height, else the header."""
    fields = {key.lower(): value for key, value in sample.items() if isinstance(key, str)}
    raw = fields.get("json")
    if raw:
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        width, height = meta.get("width"), meta.get("height")
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            return width, height
    data = next((fields[ext] for ext in IMAGE_EXTENSIONS if ext in fields), None)
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except Exception:  # undecodable header: the sample is skipped (counted) by the caller
        return None
    return (width, height) if width > 0 and height > 0 else None


def probe_latent_shape(sample: Sample) -> tuple[int, int] | None:
    """(h, w) of a latent sample's moments from the .npy header alone."""
    data = next((v for k, v in sample.items() if isinstance(k, str) and k.lower() == MOMENTS_MEMBER), None)
    if data is None:
        return None
    try:
        buffer = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(buffer)  # the header only, no data
    except Exception:
        return None
    return (int(shape[-2]), int(shape[-1])) if len(shape) == 3 else None


class Bucketer:
    """Queues of raw samples per bucket; hands out one bucket's worth of samples when a queue fills.

    `latent_factor` set: samples are latent moments, grouped by their stored shape
    (latent h*factor, w*factor must be a bucket), not by aspect ratio.
    """

    def __init__(self, buckets: Sequence[Bucket], batch_size: int, latent_factor: int | None = None) -> None:
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.latent_factor = latent_factor
        self._index = {b: i for i, b in enumerate(self.buckets)}
        self.queues: list[list[Sample]] = [[] for _ in self.buckets]

    def assign(self, sample: Sample) -> int | None:
        """The bucket index of a raw sample, or None when its size cannot be read (a bad sample)."""
        if self.latent_factor is not None:
            shape = probe_latent_shape(sample)
            if shape is None:
                return None
            pixels = (shape[0] * self.latent_factor, shape[1] * self.latent_factor)
            if pixels not in self._index:
                raise ValueError(f"latent sample {sample.get('__key__')} has shape {shape} (pixels {pixels}), "
                                 f"which is none of the buckets {self.buckets}")
            return self._index[pixels]
        size = probe_size(sample)
        return None if size is None else nearest_bucket(size[0], size[1], self.buckets)

    def add(self, sample: Sample, bucket: int) -> tuple[int, list[Sample]] | None:
        """Queue a sample; when its bucket holds a batch, take that batch out and return (bucket, samples)."""
        queue = self.queues[bucket]
        queue.append(sample)
        if len(queue) < self.batch_size:
            return None
        self.queues[bucket] = []
        return bucket, queue

    def held(self) -> list[int]:
        """`__pos__` of every queued sample (the data position's "held" list); O(queued samples)."""
        return [int(s["__pos__"]) for queue in self.queues for s in queue if "__pos__" in s]

    def restore(self, skipped: Iterable[Sample], held: Iterable[int]) -> int:
        """Rebuild the queues during a cursor-based resume skip: keep the skipped samples whose `__pos__`
        the checkpoint's data position lists as held (pulled, not yet batched). Returns how many were kept.

        For a resume that knows the consumer's cursor and held list (data_position) instead of a batch
        count: the caller skips `cursor` raw samples through this, then batches the rest as usual.
        """
        wanted = set(int(p) for p in held)
        kept = 0
        for sample in skipped:
            if int(sample.get("__pos__", -1)) not in wanted:
                continue
            bucket = self.assign(sample)
            if bucket is not None and self.add(sample, bucket) is not None:
                raise RuntimeError("the held samples fill a whole bucket: the data position is not from this stream")
            kept += bucket is not None
        return kept

    def leftovers(self, missing: int) -> tuple[list[tuple[int, list[Sample]]], int]:
        """The `missing` largest partial queues (the caller pads each with repeats of its own samples).

        Returns ([(bucket, samples)], samples dropped from the other queues) and empties the
        queues. Ties go to the lower bucket index, so a resumed stream forms the same batches.
        """
        order = sorted((i for i, q in enumerate(self.queues) if q), key=lambda i: (-len(self.queues[i]), i))
        batches = [(i, self.queues[i]) for i in order[:max(0, missing)]]
        dropped = sum(len(self.queues[i]) for i in order[missing:])
        self.queues = [[] for _ in self.buckets]
        return batches, dropped

    def batches(self, raw: Iterable[Sample], on_bad: Any = None) -> Iterator[tuple[int, list[Sample]]]:
        """Every full batch the raw stream forms, in order; samples of unreadable size go to `on_bad`."""
        for sample in raw:
            bucket = self.assign(sample)
            if bucket is None:
                if on_bad is not None:
                    on_bad(sample)
                continue
            full = self.add(sample, bucket)
            if full is not None:
                yield full
