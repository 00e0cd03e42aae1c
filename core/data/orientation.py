"""Reorientation by the NIfTI affine to the one canonical axis order every model input has.

The canonical model input (C, D, H, W) is, whatever orientation a file is stored in:

    D  slices, patient inferior → superior
    H  patient right → left
    W  patient anterior → posterior

Why this order: it is what CT-CLIP's model saw. CT-RATE stores its volumes
LPS (nibabel axis codes ``('L', 'P', 'S')``: voxel index i runs towards the
patient's left, j towards posterior, k towards superior), and CT-CLIP's
loaders (``scripts/data.py``, ``scripts/data_inference_nii.py``) take
``nib.load(path).get_fdata()`` as it is stored, resample it as
``transpose(2, 0, 1)``, go back with ``transpose(1, 2, 0)``, crop / pad and
finally feed ``permute(2, 0, 1)``: (k, i, j) = (slices, right → left,
anterior → posterior). So a model converted from CT-CLIP's checkpoint gets
its volumes the way it was trained on them. Here each file is first turned
into that LPS array by its affine (nibabel's ``io_orientation`` /
``ornt_transform`` / ``apply_orientation``), so a volume stored RAS, or with
its slices first, lands on the same voxels as one stored like CT-RATE.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

CANONICAL_AXCODES = ("L", "P", "S")  # the NIfTI array orientation CT-RATE stores and CT-CLIP read
LPS_TO_DHW = (2, 0, 1)  # CT-CLIP's permute(2, 0, 1): array (i, j, k) → model (D, H, W) = (k, i, j)


def to_canonical(data: np.ndarray, affine: np.ndarray,
                 zooms: tuple[float, float, float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A stored 3D array and its affine → the (D, H, W) model-order array and voxel sizes (mm, D, H, W).

    The array is flipped and transposed by the affine to LPS (exact: no
    interpolation; an oblique affine goes to its closest axes), then
    permuted ``(2, 0, 1)`` as CT-CLIP does. ``zooms`` are the header's voxel
    sizes in stored axis order.
    """
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL_AXCODES))
    lps = apply_orientation(data, transform)
    lps_zooms = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(transform):
        lps_zooms[int(target)] = float(zooms[axis])
    dhw = tuple(lps_zooms[axis] for axis in LPS_TO_DHW)
    return lps.transpose(LPS_TO_DHW), dhw
