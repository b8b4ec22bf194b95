"""Inputs Segmenter refuses with a named reason instead of computing something unintended:
a support "label map" with hundreds of values, complex images, empty images."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from megaseg import Segmenter, create_model


@pytest.fixture
def seg():
    torch.manual_seed(0)
    return Segmenter(create_model("universeg_v1", encoder_widths=[8, 8, 8, 8]), 32, "cpu")


@pytest.fixture
def disk():
    yy, xx = np.mgrid[:24, :24]
    return ((yy - 12) ** 2 + (xx - 12) ** 2 < 36).astype(np.uint8)


def test_a_support_label_map_with_more_values_than_max_labels_is_refused(seg, disk):
    image = np.arange(24 * 24, dtype=np.float32).reshape(24, 24)
    values = (np.arange(24 * 24).reshape(24, 24) % 300).astype(np.int32)  # 299 nonzero values
    with pytest.raises(ValueError, match=r"support_labels: 299 distinct label values.*max_labels"):
        seg.set_support([image], [values])
    seg.set_support([image], [values % 3], max_labels=2)  # within the limit
    assert seg.labels == (1, 2)
    seg.set_support([image], [values], max_labels=299)  # asked for explicitly
    assert len(seg.labels) == 299


@pytest.mark.parametrize("where", ["support", "query", "volume", "nifti"])
def test_complex_images_are_refused(seg, disk, tmp_path, where):
    complex_image = disk * (100.0 + 5j)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="complex values"):
            if where == "support":
                seg.set_support([complex_image], [disk])
            else:
                seg.set_support([disk * 100.0], [disk])
                if where == "query":
                    seg.predict(complex_image)
                elif where == "volume":
                    seg.predict_volume(np.stack([complex_image] * 2, axis=-1))
                else:
                    path = tmp_path / "complex.nii.gz"
                    volume = np.stack([complex_image] * 2, axis=-1).astype(np.complex64)
                    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
                    seg.predict_volume(path)
    assert not [w for w in caught if issubclass(w.category, np.exceptions.ComplexWarning)]


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
def test_an_empty_query_or_support_image_is_refused(seg, disk, shape):
    with pytest.raises(
        ValueError, match=rf"query: empty image of shape \({shape[0]}, {shape[1]}\)"
    ):
        seg.set_support([disk * 100.0], [disk]).predict(np.zeros(shape))
    with pytest.raises(ValueError, match=r"support_images\[0\]: empty image"):
        seg.set_support([np.zeros(shape)], [np.zeros(shape, np.uint8)])
