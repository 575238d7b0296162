"""The torch-free checkpoint reader against torch.load, on what torch.save really writes."""

import ml_dtypes
import numpy as np
import pytest
import torch

from jaxspeech.convert.common import CheckpointError, read_state_dict, read_torch_file


def test_reader_matches_torch_load_for_dtypes_views_and_shared_storage(tmp_path):
    base = torch.randn(6, 4)
    state = {
        "float32": base,
        "transposed_view": base.t(),  # non-contiguous: strides must be honoured
        "slice_view": base[2:5, 1:3],  # offset into a shared storage
        "float16": torch.randn(3, 5).half(),
        "bfloat16": torch.randn(7).bfloat16(),
        "float64": torch.randn(2, 2, 2).double(),
        "int64": torch.arange(5),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "num_batches_tracked": torch.tensor(7),
    }
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "x.ckpt")
    ours = read_state_dict(tmp_path / "x.ckpt")
    assert set(ours) == set(state)
    for key, tensor in state.items():
        ref = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = ours[key].astype(np.float32) if ours[key].dtype == ml_dtypes.bfloat16 else ours[key]
        assert got.shape == ref.shape, key
        np.testing.assert_array_equal(got, ref, err_msg=key)
    assert ours["float16"].dtype == np.float16 and ours["int64"].dtype == np.int64


def test_reader_refuses_code_in_the_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"builtins\.print, which a weights file"):
        read_torch_file(tmp_path / "evil.pt")


def test_a_file_that_is_not_a_state_dict_is_named(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "list.pt")
