"""Segment Anything (SAM) prompted with boxes: one image embedding, all boxes in one batched decoder call.

Coordinates: boxes are XYXY pixel coordinates of the original image with inclusive maxima, which is the
convention of `MedCLIPSAMLib.boxes.boxes_from_mask` and of SAM's own prompt encoder (it adds 0.5 to move
each corner to the pixel centre).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import numpy as np
import torch

from MedCLIPSAMLib.errors import InvalidInputError
from MedCLIPSAMLib.sam_encoder import encode_image

__all__ = ["SamBoxSegmenter"]

logger = logging.getLogger(__name__)

# Memory allowed for the masks that one decoder call upsamples to the original image size. SAM upsamples every
# box's low-resolution logits to the model input side and then to the image size in float32, so N boxes on a
# 3000 x 2500 X-ray take about N x 34 MB. The value is a safety bound, not a measured optimum.
DEFAULT_MAX_MASK_BYTES = 1 << 30

SUPPORTED_ENCODER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Compute types accepted for the SAM image encoder (`SamBoxSegmenter`'s ``encoder_dtype``)."""


def _image_fingerprint(rgb: np.ndarray) -> str:
    """Return a digest of the array's shape, dtype and bytes, used to recognise an image already embedded."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((rgb.shape, rgb.dtype.str)).encode("ascii"))
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()


class SamBoxSegmenter:
    """Box-prompted SAM segmentation of one image at a time, reusing the image embedding.

    Wraps `segment_anything.SamPredictor`. `set_image` computes the image embedding (skipped when the same image
    is set again), and `segment_boxes` decodes all boxes of the image in one `predict_torch` call with
    ``multimask_output=False`` and returns the union of the box masks (SAM logits > ``model.mask_threshold``,
    which is 0).

    With ``encoder_dtype=torch.bfloat16`` (or float16) the image encoder, which does almost all of SAM's
    arithmetic, runs under `torch.autocast`: its matrix products run in that type while the weights stay float32.
    The embedding is converted back to float32, so the prompt encoder and mask decoder always run in float32. The
    model itself is not converted because SAM's positional encodings are float32 buffers that the prompt encoder
    multiplies with float32 coordinates.

    With ``piecewise_attention=True`` (the default) the image encoder runs through `MedCLIPSAMLib.sam_encoder`, which
    computes the same attention in cache-sized pieces and leaves the model untouched. False runs segment-anything's
    own `SamPredictor.set_image`, the reference.

    Attributes:
        call_count: Number of `predict_torch` calls made so far.
        embedding_count: Number of image embeddings computed so far.
    """

    def __init__(
        self,
        sam_model,
        *,
        max_mask_bytes: int = DEFAULT_MAX_MASK_BYTES,
        encoder_dtype: torch.dtype = torch.float32,
        piecewise_attention: bool = True,
    ) -> None:
        """
        Args:
            sam_model: A `segment_anything.modeling.Sam` in eval mode; its device is used for all tensors.
            max_mask_bytes: Memory bound in bytes for the float32 masks of one decoder call (see
                `DEFAULT_MAX_MASK_BYTES`). Boxes are split into several calls only when one call would exceed it.
            encoder_dtype: Compute type of the image encoder. float32 is exact. bfloat16 and float16 run through
                `torch.autocast`, which is faster on CPUs with bfloat16 instructions and on GPUs (see the class notes).
            piecewise_attention: Compute the image embedding with `MedCLIPSAMLib.sam_encoder.encode_image` (faster, same
                values up to rounding) instead of segment-anything's own encoder forward.
        """
        from segment_anything import SamPredictor

        if max_mask_bytes <= 0:
            raise InvalidInputError(f"max_mask_bytes must be positive, got {max_mask_bytes}.")
        if encoder_dtype not in SUPPORTED_ENCODER_DTYPES:
            raise InvalidInputError(
                f"Unsupported SAM encoder dtype {encoder_dtype!r}: use torch.float32, torch.bfloat16 or torch.float16."
            )
        self.model = sam_model
        self.encoder_dtype = encoder_dtype
        self.piecewise_attention = bool(piecewise_attention)
        self.predictor = SamPredictor(sam_model)
        self.max_mask_bytes = int(max_mask_bytes)
        self.call_count = 0
        self.embedding_count = 0
        self._image_key: str | None = None
        self._image_hw: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        """Device of the SAM model's parameters."""
        return next(self.model.parameters()).device

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """(H, W) of the image whose embedding is set, or None before the first `set_image`."""
        return self._image_hw

    def set_image(self, rgb: np.ndarray, image_key: str | None = None) -> bool:
        """Compute the SAM image embedding of `rgb`, unless the same image is already set.

        Args:
            rgb: Image [H, W, 3] uint8 RGB, values 0..255.
            image_key: Optional caller-chosen identifier of the image content. When given, the embedding is
                reused if and only if the key equals the previous key. When None, a digest of the pixel data is
                the key, so a changed array is always embedded again.

        Returns:
            True when a new embedding was computed, False when the current one was reused.
        """
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            shape = getattr(rgb, "shape", None)
            dtype = getattr(rgb, "dtype", type(rgb).__name__)
            raise InvalidInputError(
                f"SAM expects an RGB image of shape (H, W, 3) and dtype uint8, got shape {shape} and dtype "
                f"{dtype}; convert it with MedCLIPSAMLib.imaging.to_rgb_uint8."
            )
        if rgb.shape[0] < 1 or rgb.shape[1] < 1:
            raise InvalidInputError(f"SAM cannot embed an empty image of shape {rgb.shape}.")

        key = image_key if image_key is not None else _image_fingerprint(rgb)
        if key == self._image_key and self.predictor.is_image_set:
            logger.debug("Reusing the SAM embedding of image %s.", key)
            return False

        with self._encoder_precision(), torch.inference_mode():
            if self.piecewise_attention:
                self._embed(np.ascontiguousarray(rgb))
            else:
                self.predictor.set_image(np.ascontiguousarray(rgb), image_format="RGB")
        # Under autocast the embedding may come out in the reduced type; the decoder runs in float32.
        self.predictor.features = self.predictor.features.float()
        self._image_key = key
        self._image_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        self.embedding_count += 1
        return True

    def _embed(self, rgb: np.ndarray) -> None:
        """Do what `SamPredictor.set_image` does, with the image encoder run by `sam_encoder.encode_image`."""
        predictor = self.predictor
        image = rgb if self.model.image_format == "RGB" else rgb[..., ::-1]
        resized = predictor.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        predictor.reset_image()
        predictor.original_size = tuple(rgb.shape[:2])
        predictor.input_size = tuple(tensor.shape[-2:])
        predictor.features = encode_image(self.model.image_encoder, self.model.preprocess(tensor))
        predictor.is_image_set = True

    def _encoder_precision(self) -> contextlib.AbstractContextManager:
        """Return the autocast context of the image encoder, or a no-op context for float32."""
        if self.encoder_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.encoder_dtype)

    def reset(self) -> None:
        """Forget the current image embedding."""
        self.predictor.reset_image()
        self._image_key = None
        self._image_hw = None

    def segment_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Segment the current image with box prompts and return the union of the box masks.

        Args:
            boxes: [N, 4] XYXY pixel coordinates of the original image, inclusive maxima, any real dtype.
                N = 0 returns an empty mask without running SAM.

        Returns:
            Mask [H, W] bool at the size of the image given to `set_image`.
        """
        if self._image_hw is None or not self.predictor.is_image_set:
            raise InvalidInputError("No image is set: call SamBoxSegmenter.set_image(rgb) before segment_boxes.")
        height, width = self._image_hw
        boxes = np.asarray(boxes)
        if boxes.size == 0:
            return np.zeros((height, width), dtype=bool)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise InvalidInputError(f"boxes must have shape (N, 4) in XYXY order, got shape {boxes.shape}.")
        if not np.all(np.isfinite(boxes)):
            raise InvalidInputError("boxes contain NaN or infinite coordinates.")
        if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
            raise InvalidInputError(f"boxes must have x_max >= x_min and y_max >= y_min, got {boxes.tolist()}.")

        # The prompt encoder's positional encoding matrix fixes the dtype that box coordinates must have.
        coordinate_dtype = self.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype
        boxes_torch = torch.as_tensor(boxes.astype(np.float64), dtype=torch.float32, device=self.device)
        boxes_torch = self.predictor.transform.apply_boxes_torch(boxes_torch, (height, width))
        boxes_torch = boxes_torch.to(coordinate_dtype)

        side = int(self.model.image_encoder.img_size)
        bytes_per_box = 4 * (side * side + height * width)
        boxes_per_call = max(1, self.max_mask_bytes // bytes_per_box)
        if boxes_per_call < len(boxes_torch):
            # NOTE: only very large images with many boxes get here; the union is the same, only the call count
            # differs from one.
            logger.info(
                "Decoding %d boxes in chunks of %d to keep the masks under %d bytes.",
                len(boxes_torch),
                boxes_per_call,
                self.max_mask_bytes,
            )

        union = torch.zeros((height, width), dtype=torch.bool, device=self.device)
        for start in range(0, len(boxes_torch), boxes_per_call):
            masks, _, _ = self.predictor.predict_torch(
                point_coords=None,
                point_labels=None,
                boxes=boxes_torch[start : start + boxes_per_call],
                multimask_output=False,
            )
            self.call_count += 1
            # masks: [n_boxes, 1, H, W] bool, logits > model.mask_threshold.
            union |= masks.any(dim=(0, 1))
        return union.cpu().numpy()
