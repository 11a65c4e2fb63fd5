"""The shapes world as pictures: the exact 36x36 canvas resized to the size an image
autoencoder works at (96x96 by default), and back.

The resize is Pillow's BOX filter, an area average: each picture pixel is the mean of the
canvas pixels it covers, which is what rendering the same scene antialiased at the larger
size gives (object edges become mixed-colour fringes, interiors stay the exact palette
colour). Going back averages the picture over each canvas pixel again, so a picture with
exact interiors lands on the canvas with every interior pixel at its palette colour and
only edge pixels mixed; the detector's nearest-palette step and its pixel thresholds
(min_area, min_side, template IoU) were made for that canvas, so detection reads pictures
through `to_canvas`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from strokes_jax.worlds import shapes

PICTURE = 96  # pixels per side of a picture: BAGEL-style image sizes are multiples of 16


def _box_resize(img: np.ndarray, size: int) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BOX))


def to_picture(img: np.ndarray, size: int = PICTURE) -> np.ndarray:
    """uint8 [CANVAS, CANVAS, 3] -> uint8 [size, size, 3], area-weighted (an antialiased
    render of the same scene at `size`)."""
    return _box_resize(img, size)


def to_canvas(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> the checker's uint8 [CANVAS, CANVAS, 3] (area-weighted); an image
    already at the canvas size is returned as it is."""
    img = np.asarray(img)
    if img.shape[:2] == (shapes.CANVAS, shapes.CANVAS):
        return img
    return _box_resize(img, shapes.CANVAS)


def episode_as_pictures(episode, size: int = PICTURE):
    """The episode with every canvas-sized image (sketches and refined images) as a `size`
    picture; images of any other size, and the episode itself, are left as they are."""
    import dataclasses

    def fit(img):
        img = np.asarray(img)
        if img.shape[:2] == (shapes.CANVAS, shapes.CANVAS) and size != shapes.CANVAS:
            return to_picture(img, size)
        return img
    steps = [dataclasses.replace(st, sketch=fit(st.sketch),
                                 refined=None if st.refined is None else fit(st.refined))
             for st in episode.steps]
    return dataclasses.replace(episode, steps=steps)
