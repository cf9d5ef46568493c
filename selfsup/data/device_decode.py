"""Device decode (``--decode device``): loader workers move bytes; decoding and cropping run on the device.

A :class:`~selfsup.data.stream.FolderStream` in bytes mode yields each file's encoded bytes with its
label and ``(epoch, index)``; :func:`bytes_collate` keeps them as a list (:class:`EncodedBatch`), which
carries the placement (the random-resized crop or the evaluation crop) and seed. Before the batch is
moved to the device, :func:`decode_batch` decodes its JPEGs in one call to ``torchvision.io.decode_jpeg``
on the training device (nvJPEG on a GPU; libjpeg-turbo on the CPU, which is how CI tests this path),
decodes anything else with PIL, and cuts every view with the same geometry the CPU path uses
(:mod:`selfsup.data.geometry`, boxes drawn from ``(seed, epoch, index)``): a GPU node needs almost no
CPU per image, and the CPU tests cover the GPU's code path.
"""

from __future__ import annotations

import warnings

import torch

from selfsup.data.decode import decode_jpeg_bytes, decode_view
from selfsup.data.geometry import Placement, TrainCrop, crop_resize, draw_rng
from selfsup.errors import DataError

DECODE_MODES = ("loader", "device")
"""``loader``: workers decode and crop; ``device``: workers read bytes, the training device decodes."""

_JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedBatch(list):
    """A batch's encoded images (1-D uint8 tensors), with the names, placement and seed to decode them."""

    def __init__(self, items, names: list[str], place: Placement, seed: int, skip_bad: bool) -> None:
        super().__init__(items)
        self.names, self.place, self.seed, self.skip_bad = names, place, seed, skip_bad

    def __reduce__(self):  # from loader workers to the main process, with its attributes
        return EncodedBatch, (list(self), self.names, self.place, self.seed, self.skip_bad)


def bytes_collate(samples: list) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
    """``[(bytes, label, (epoch, index), name, place, seed, skip_bad)]`` -> ``(EncodedBatch, labels, keys)``."""
    first = samples[0]
    batch = EncodedBatch([s[0] for s in samples], [s[3] for s in samples], first[4], first[5], first[6])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    keys = torch.tensor([s[2] for s in samples], dtype=torch.int64)  # (B, 2): epoch, index
    return batch, labels, keys


def decode_batch(
    batch: EncodedBatch, labels: torch.Tensor, keys: torch.Tensor, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode, crop and resize a bytes batch on ``device``; returns ``(images (B, 3, S, S) uint8, labels)``.

    Raises:
        DataError: an image does not decode (naming it), unless the batch says to skip bad images:
            then the image is left out of the batch, with a warning.
    """
    device = torch.device(device)
    place = batch.place
    views: list[torch.Tensor | None] = [None] * len(batch)
    jpegs = [i for i, data in enumerate(batch) if bytes(data[:3].tolist()) == _JPEG_MAGIC]
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg

            out = decode_jpeg([batch[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            decoded = dict(zip(jpegs, out, strict=True))
        except RuntimeError:  # one bad file fails the whole call: decode one by one to name it
            for i in jpegs:
                try:
                    decoded[i] = decode_jpeg_bytes(bytes(batch[i].numpy()), batch.names[i], device)
                except DataError as err:
                    decoded[i] = err  # type: ignore[assignment]
    bad: list[str] = []
    for i in range(len(batch)):
        epoch, index = (int(v) for v in keys[i])
        rng = draw_rng(batch.seed, epoch, index) if isinstance(place, TrainCrop) else None
        try:
            if i in decoded:
                image = decoded[i]
                if isinstance(image, DataError):
                    raise image
                box = place.box(int(image.shape[1]), int(image.shape[2]), rng)
                views[i] = crop_resize(image, box, place.size)
            else:  # PNG, WebP, ...: PIL on the host, then the device
                views[i] = decode_view(bytes(batch[i].numpy()), place, rng, name=batch.names[i], reduce=False).to(device)
        except DataError as err:
            if not batch.skip_bad:
                raise
            bad.append(str(err))
    if bad:
        warnings.warn(f"skipped {len(bad)} bad image(s) in a batch (first: {bad[0]})", stacklevel=2)
    keep = [i for i, v in enumerate(views) if v is not None]
    if not keep:
        raise DataError(f"no readable image left in a batch after skipping {len(bad)} bad file(s)")
    images = torch.stack([views[i] for i in keep])  # (B, 3, S, S)
    return images, labels[keep].to(device)
