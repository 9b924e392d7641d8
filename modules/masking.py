"""Masks for inpainting: from the user's picture to what the sampler and the paste-back need.

AUTOMATIC1111's rules, step by step:
- the mask is made binary (an RGBA picture's alpha, or its grey levels), inverted when asked
  (`inpainting_mask_invert`), then blurred (`mask_blur_x`, `mask_blur_y`: a Gaussian of that
  sigma, kernel `2 * int(2.5 * sigma + 0.5) + 1`, as its cv2.GaussianBlur call);
- "only masked" (`inpaint_full_res`) crops the picture to the mask's box plus padding, grown to
  the job's aspect ratio, works on that crop at the job's full size and pastes the result back;
- the latent mask (the blurred mask at latent resolution, rounded to 0/1) drives the blend
  `init_latent * mask + nmask * denoised` after every denoiser call (`MaskedDenoiser`), so the
  unmasked area stays on the init image;
- the finished picture is laid over the original through the blurred mask (`overlay`), so
  pixels outside the mask are exactly the init image's.

Inpainting checkpoints (a 9-channel UNet) also get `[mask, masked image latents]` as extra
input channels at every call (`ImageConditionedModel`), as diffusers' StableDiffusionInpaintPipeline
and AUTOMATIC1111's `c_concat` feed them.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from modules.sd_samplers_common import to_eps


# ---- the mask in pixels ------------------------------------------------------------------------------

def create_binary_mask(image: Image.Image) -> Image.Image:
    """AUTOMATIC1111's `create_binary_mask`: an RGBA picture with real transparency -> its alpha
    thresholded at 128; anything else -> its grey levels (mode L)."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    return image.convert("L")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(ksize, sigma) with A1111's ksize = 2 * int(2.5 * sigma + 0.5) + 1."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """A 1-D Gaussian blur along `axis` with cv2's default border (BORDER_REFLECT_101)."""
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    if a.shape[axis] > r:
        padded = np.pad(a, pad, mode="reflect")  # numpy's "reflect" is cv2's BORDER_REFLECT_101
    else:
        padded = np.pad(a, pad, mode="edge")
    out = np.zeros_like(a, dtype=np.float64)
    n = a.shape[axis]
    for i, w in enumerate(k):
        out += w * (padded[:, i:i + n] if axis == 1 else padded[i:i + n, :])
    return out


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """The mask blurred across (x) then down (y), as AUTOMATIC1111's two cv2.GaussianBlur calls."""
    a = np.asarray(mask.convert("L"), dtype=np.float64)
    if blur_x > 0:
        a = np.clip(np.round(_blur_axis(a, blur_x, axis=1)), 0, 255)
    if blur_y > 0:
        a = np.clip(np.round(_blur_axis(a, blur_y, axis=0)), 0, 255)
    return Image.fromarray(a.astype(np.uint8), "L")


def get_crop_region(mask: np.ndarray, pad: int = 0) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around every non-zero pixel of `mask`, grown by `pad` and clipped to
    the picture; None for an empty mask (AUTOMATIC1111 then inpaints the whole picture)."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return None
    x1, x2 = int(cols[0]), int(cols[-1]) + 1
    y1, y2 = int(rows[0]), int(rows[-1]) + 1
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def expand_crop_region(crop_region: tuple[int, int, int, int], processing_width: int, processing_height: int,
                       image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """Grow the box to the aspect ratio of the size it will be processed at (AUTOMATIC1111's
    `expand_crop_region`): a 128x32 box processed at 512x512 becomes 128x128, kept inside the image."""
    x1, y1, x2, y2 = crop_region
    ratio_crop_region = (x2 - x1) / (y2 - y1)
    ratio_processing = processing_width / processing_height
    if ratio_crop_region > ratio_processing:
        y1, y2 = _grow_span(y1, y2, (x2 - x1) / ratio_processing, image_height)
    else:
        x1, x2 = _grow_span(x1, x2, (y2 - y1) * ratio_processing, image_width)
    return x1, y1, x2, y2


def _grow_span(lo: int, hi: int, size: float, limit: int) -> tuple[int, int]:
    """One side of `expand_crop_region`: grow [lo, hi) about its centre to `size`, shifted back inside [0, limit)."""
    diff = int(size - (hi - lo))
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`inpainting_fill = 0` ("fill"): the masked area painted with the colours around it, by
    compositing ever less blurred copies of the unmasked picture (AUTOMATIC1111's `fill`)."""
    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def overlay_image(image: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The init picture with the (blurred) masked area made transparent: what is laid over the result."""
    masked = Image.new("RGBa", (image.width, image.height))
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return masked.convert("RGBA")


def apply_overlay(image: Image.Image, paste_to: tuple[int, int, int, int] | None, overlay: Image.Image | None,
                  resize=None) -> Image.Image:
    """Paste the result back: for "only masked" first into its box of the original picture, then the
    original's unmasked pixels over it (AUTOMATIC1111's `apply_overlay`). `resize(im, w, h)` is
    images.resize_image's crop-and-resize (mode 1)."""
    if overlay is None:
        return image
    if paste_to is not None:
        x, y, w, h = paste_to
        base = Image.new("RGBA", (overlay.width, overlay.height))
        image = resize(image, w, h) if resize is not None else image.resize((w, h), Image.LANCZOS)
        base.paste(image, (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


def latent_masks(mask: Image.Image, latent_shape: tuple[int, int, int], device, dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, nmask) at latent resolution: `mask` is 1 where the init image is kept, `nmask` 1 where
    the picture is repainted; AUTOMATIC1111 resizes the blurred mask (PIL's default filter) and rounds."""
    c, h, w = latent_shape
    latmask = np.asarray(mask.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255
    latmask = np.around(latmask)
    latmask = np.tile(latmask[None], (c, 1, 1))
    nmask = torch.from_numpy(latmask).to(device=device, dtype=dtype)
    return 1.0 - nmask, nmask


# ---- in the sampling loop -----------------------------------------------------------------------------

def from_x0(pred_x0: torch.Tensor, x: torch.Tensor, alpha: float, prediction_type: str) -> torch.Tensor:
    """The model output (in `prediction_type`) that would have given `pred_x0` at `x`: the inverse of to_x0."""
    if prediction_type == "epsilon":
        return (x - alpha ** 0.5 * pred_x0) / (1 - alpha) ** 0.5
    if prediction_type == "v_prediction":
        eps = (x - alpha ** 0.5 * pred_x0) / (1 - alpha) ** 0.5
        return alpha ** 0.5 * eps - (1 - alpha) ** 0.5 * pred_x0
    if prediction_type == "sample":
        return pred_x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


class MaskedDenoiser:
    """Wraps the CFG denoiser: after every call the guided prediction of the clean latent is blended
    with the init latent, `init_latent * mask + nmask * pred_x0` (AUTOMATIC1111's CFGDenoiser blend), and
    the model output and epsilon are recomputed from it, so samplers that step with `model_output`
    (the diffusers-driven ones), with `eps` (DDIM) or with `pred_x0` (k-diffusion style) all see the
    same blended prediction. The branches' predictions are blended too, so previews and the
    trajectory inspector show the picture being made, not the model's guess for the kept area.
    """

    _own = ("inner", "model", "init_latent", "mask", "nmask")

    def __init__(self, inner, model, init_latent: torch.Tensor, mask: torch.Tensor, nmask: torch.Tensor):
        for name, value in zip(self._own, (inner, model, init_latent, mask, nmask)):
            object.__setattr__(self, name, value)

    def __getattr__(self, name):  # steps, guidance, conditioning_at, ... of the wrapped denoiser
        return getattr(self.inner, name)

    def __setattr__(self, name, value):  # a sampler that changes the guidance (DDIM CFG++) changes the inner one's
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def blend(self, latent: torch.Tensor) -> torch.Tensor:
        return self.init_latent.to(latent.dtype) * self.mask.to(latent.dtype) + self.nmask.to(latent.dtype) * latent

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep: float, alpha: float, step: int):
        out = self.inner(x, timestep, alpha, step)
        pred_x0 = self.blend(out.pred_x0)
        prediction_type = self.model.prediction_type
        model_output = from_x0(pred_x0, x, alpha, prediction_type)
        eps = to_eps(model_output, x, alpha, prediction_type)
        branches = {k: self.blend(v) for k, v in out.branches.items()}
        return replace(out, model_output=model_output, eps=eps, pred_x0=pred_x0, branches=branches)


class ImageConditionedModel:
    """The model as the CFG denoiser sees it, for an inpainting checkpoint: every UNet call gets the
    job's image conditioning (`[mask, masked image latents]`, one row per image) as extra input
    channels, row for row with the branches the denoiser batched ([base | prompt parts | negative])."""

    def __init__(self, model, image_conditioning: torch.Tensor, part_image: torch.Tensor | None = None):
        self.model = model
        self.image_conditioning = image_conditioning
        self.part_image = part_image  # image index of each AND part (the CFG denoiser's `part_image`)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def rows_for(self, batch: int) -> torch.Tensor:
        ic = self.image_conditioning
        n = ic.shape[0]
        if batch % n == 0 and (self.part_image is None or len(self.part_image) == n):
            return ic.repeat(batch // n, 1, 1, 1)
        parts = ic[self.part_image.to(ic.device)]
        for layout in ([ic, parts], [ic, parts, ic], [parts]):
            if sum(t.shape[0] for t in layout) == batch:
                return torch.cat(layout)
        raise ValueError(f"cannot match {n} image conditionings to a UNet batch of {batch}")

    def apply_model(self, x: torch.Tensor, t, cond) -> torch.Tensor:
        return self.model.apply_model(x, t, cond, image_conditioning=self.rows_for(x.shape[0]).to(x.dtype))


def inpainting_image_conditioning(model, source_image: torch.Tensor, latent_shape: tuple[int, ...],
                                  image_mask: Image.Image | None = None, mask_weight: float = 1.0) -> torch.Tensor:
    """AUTOMATIC1111's `inpainting_image_conditioning`: the mask (rounded to 0/1, at pixel resolution,
    then nearest-resized to the latent's), and the VAE latents of `source * (1 - mask)` (lerped with
    `mask_weight`, AUTOMATIC1111's "Inpainting conditioning mask strength", 1 by default).
    `source_image` is (N, 3, H, W) in [-1, 1]; no mask means "repaint everything" (txt2img and hires)."""
    if image_mask is not None:
        m = np.asarray(image_mask.convert("L"), dtype=np.float32) / 255.0
        conditioning_mask = torch.round(torch.from_numpy(m)[None, None])
    else:
        conditioning_mask = source_image.new_ones(1, 1, *source_image.shape[-2:])
    conditioning_mask = conditioning_mask.to(device=source_image.device, dtype=source_image.dtype)
    conditioning_image = torch.lerp(source_image, source_image * (1.0 - conditioning_mask), mask_weight)
    latents = model.encode_first_stage(conditioning_image)
    conditioning_mask = torch.nn.functional.interpolate(conditioning_mask.float(), size=tuple(latent_shape[-2:]))
    conditioning_mask = conditioning_mask.expand(latents.shape[0], -1, -1, -1).to(latents.device, latents.dtype)
    return torch.cat([conditioning_mask, latents], dim=1).to(model.device, model.dtype)
