"""Qwen2-VL pixel values by table lookup: the same float32 numbers, faster.

The reader's training loop (:mod:`sparsemm_utils.tiny_reader.training`) turns 24 small uint8
pages into ``pixel_values`` every step. transformers' Qwen2-VL PIL image processor does, per image,
``resize`` (a no-op when the page already has the size ``smart_resize`` chooses: every reader
page is a whole number of 28 px cells), ``rescale`` (uint8 -> float64, times 1/255, -> float32),
``normalize`` (``(x - mean[c]) / std[c]`` in float32) and ``patchify`` (reshape/transpose into
``(patches, C * T * 14 * 14)``). The lookup replaces the float arithmetic of rescale and
normalize, per pixel, by one table read (docs/tiny_reader.md has its measured speed-up).

Rescale and normalize are element-wise, so each of the 256 byte values of channel ``c`` always
becomes the same float32. :class:`LookupQwen2VLImageProcessor` runs the processor's OWN
``rescale`` and ``normalize`` once on a ``(C, 1, 256)`` ramp to build that table, patchifies
the uint8 page, and looks the bytes up: the result is bit-identical (checked by
``tests/integration/test_fast_pixels.py`` against the stock processor, on reader pages and on odd
sizes). Any image the shortcut does not cover (a resize that changes the size, a non-uint8
array, rescale or normalize switched off) goes through the stock code unchanged.

:func:`with_lookup_pixels` returns a shallow copy of a Qwen2-VL processor that uses it; the
original processor (the one :func:`~sparsemm_utils.tiny_reader.training.save_reader` writes) is untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from transformers.image_processing_utils import BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

__all__ = ["LookupQwen2VLImageProcessor", "with_lookup_pixels"]


class LookupQwen2VLImageProcessor(Qwen2VLImageProcessorPil):
    """:class:`Qwen2VLImageProcessorPil` whose ``_preprocess`` looks pixels up in a table when
    that gives the same numbers (module docstring); ``(sum of patches, C * T * p * p)`` float32
    ``pixel_values`` and ``(images, 3)`` int64 ``image_grid_thw``, as the stock processor."""

    def _lookup_table(self, rescale_factor: float, image_mean: Any, image_std: Any) -> np.ndarray:
        """``(3, 256)`` float32: entry ``[c, v]`` is what byte ``v`` of channel ``c`` becomes
        after the processor's own rescale and normalize."""
        key = (float(rescale_factor), repr(image_mean), repr(image_std))
        cache = self.__dict__.setdefault("_lookup_cache", {})
        if key not in cache:
            ramp = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()  # (C, H=1, W=256)
            values = self.normalize(self.rescale(ramp, rescale_factor), image_mean, image_std)
            cache[key] = np.ascontiguousarray(values, dtype=np.float32).reshape(3, 256)
        return cache[key]

    def _preprocess(  # type: ignore[override]
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: Any,
        resample: Any,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: Any,
        image_std: Any,
        patch_size: int,
        temporal_patch_size: int,
        merge_size: int,
        return_tensors: Any,
        **kwargs: Any,
    ) -> BatchFeature:
        factor = patch_size * merge_size

        def covered(image: np.ndarray) -> bool:
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] == 3):
                return False
            h, w = image.shape[1:]
            if do_resize and smart_resize(h, w, factor=factor, min_pixels=size.shortest_edge, max_pixels=size.longest_edge) != (h, w):
                return False
            return h % factor == 0 and w % factor == 0

        if not (do_rescale and do_normalize and images and all(covered(im) for im in images)):
            return super()._preprocess(
                images, do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
                patch_size, temporal_patch_size, merge_size, return_tensors, **kwargs,
            )
        table = self._lookup_table(rescale_factor, image_mean, image_std)
        all_patches, all_grids = [], []
        for image in images:
            channel, height, width = image.shape
            values = np.empty((channel, height, width), dtype=np.float32)
            for c in range(channel):  # byte v of channel c -> table[c, v]
                np.take(table[c], image[c], out=values[c])
            grid_h, grid_w = height // patch_size, width // patch_size
            # the stock patchify: (gh, gw, mh, mw, C, ph, pw), the temporal axis broadcast, flattened
            patches = values.reshape(channel, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size)
            patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)
            patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, *patches.shape[5:]))
            all_patches.append(patches.reshape(grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size))
            all_grids.append([1, grid_h, grid_w])
        return BatchFeature(
            data={"pixel_values": np.concatenate(all_patches, axis=0), "image_grid_thw": np.array(all_grids, dtype=np.int64)},
            tensor_type=return_tensors,
        )


def with_lookup_pixels(processor: Any) -> Any:
    """A shallow copy of ``processor`` whose image processor is a
    :class:`LookupQwen2VLImageProcessor` with the same settings (same outputs, faster). A
    processor whose image processor is not Qwen2-VL's PIL one is returned as it is."""
    image_processor = getattr(processor, "image_processor", None)
    if type(image_processor) is not Qwen2VLImageProcessorPil:
        return processor
    fast = copy.copy(image_processor)
    fast.__class__ = LookupQwen2VLImageProcessor
    out = copy.copy(processor)
    out.image_processor = fast
    return out
