"""Preprocessing fitted on training data and the Scaler that applies it inside the model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vae.preprocess import Preprocessing, Scaler


# --- Preprocessing.fit(scaling='auto') --------------------------------------------------------------

def test_auto_maps_an_integer_list_column_by_its_own_range_not_by_its_dtype():
    x = np.random.randint(0, 256, size=(100, 5)).astype(np.uint8)
    x[0, 0], x[0, 1] = 0, 255
    pre = Preprocessing.fit(x, ["image"], "list")
    assert pre.scaling == "range"
    assert pre.offset == [0.0] * 5 and pre.scale == pytest.approx([1 / 255] * 5)
    assert pre.unit_interval


def test_grey_levels_0_16_in_a_uint8_column_fill_the_unit_interval():
    # scikit-learn's digits as stored: dividing by 255 would squeeze them into [0, 0.063]
    x = np.random.randint(0, 17, size=(100, 64)).astype(np.uint8)
    x[0, 0], x[0, 1] = 0, 16
    pre = Preprocessing.fit(x, ["image"], "list")
    assert pre.scaling == "range"
    y = Scaler(pre, 64)(torch.from_numpy(x))
    assert float(y.min()) == 0.0 and float(y.max()) == pytest.approx(1.0)


def test_range_keeps_the_contrast_between_features():
    # one offset and scale for the whole vector: a dim pixel stays dimmer than a bright one
    x = np.array([[0, 10, 200], [5, 20, 100]], dtype=np.uint8)
    pre = Preprocessing.fit(x, ["image"], "list")
    assert len(set(pre.scale)) == 1 and len(set(pre.offset)) == 1


def test_auto_maps_whole_numbers_stored_as_floats_by_their_range():
    # pixel values often arrive as float64 columns; integral values still count as integers
    x = np.random.randint(0, 256, size=(50, 4)).astype(np.float64)
    assert Preprocessing.fit(x, ["image"], "list").scaling == "range"


@pytest.mark.parametrize("x", [np.random.rand(50, 3), np.random.randint(0, 2, size=(50, 3))],
                         ids=["floats-in-0-1", "binary-ints"])
def test_auto_picks_none_for_data_already_in_0_1(x):
    pre = Preprocessing.fit(x, ["a"], "list")
    assert pre.scaling == "none"
    assert pre.offset == [0.0] * 3 and pre.scale == [1.0] * 3


@pytest.mark.parametrize("x", [np.random.randn(200, 3) * 5 + 2, np.random.randint(0, 1000, size=(200, 3)),
                               np.random.randint(-5, 5, size=(200, 3)), np.random.rand(200, 3) * 255.5],
                         ids=["gaussian", "ints-above-255", "negative-ints", "fractional-0-255"])
def test_auto_picks_standardize_otherwise(x):
    pre = Preprocessing.fit(x, ["a", "b", "c"], "scalars")
    assert pre.scaling == "standardize"
    assert pre.offset == pytest.approx(x.mean(0).tolist())
    assert pre.scale == pytest.approx((1 / x.std(0)).tolist())
    assert not pre.unit_interval


def test_standardize_keeps_constant_columns_finite():
    x = np.c_[np.random.randn(20), np.full(20, 7.0)]
    pre = Preprocessing.fit(x, ["a", "b"], "scalars", scaling="standardize")
    assert pre.offset[1] == 7.0 and pre.scale[1] == 1.0          # no division by a zero std


def test_minmax_maps_each_feature_to_the_unit_interval():
    x = np.array([[0.0, -10.0], [5.0, 10.0], [10.0, 0.0]])
    pre = Preprocessing.fit(x, ["a", "b"], "scalars", scaling="minmax")
    y = Scaler(pre, 2)(torch.tensor(x))
    assert torch.allclose(y, torch.tensor([[0.0, 0.0], [0.5, 1.0], [1.0, 0.5]]))


def test_fit_rejects_an_unknown_scaling():
    with pytest.raises(ValueError, match="scaling must be"):
        Preprocessing.fit(np.zeros((2, 2)), ["a"], "list", scaling="log")


@pytest.mark.parametrize("kwargs,match", [
    (dict(layout="columns"), "layout must be"),
    (dict(scaling="log"), "scaling must be one of"),
    (dict(offset=[0.0, 1.0], scale=[1.0]), "same length"),
])
def test_preprocessing_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocessing(**kwargs)


# --- Scaler -----------------------------------------------------------------------------------------

def test_standardize_scaler_round_trips_and_whitens():
    x = np.random.randn(500, 4) * [1, 10, 100, 0.1] + [0, -3, 50, 2]
    pre = Preprocessing.fit(x, ["v"], "list")
    s = Scaler(pre, 4)
    raw = torch.tensor(x, dtype=torch.float32)
    y = s(raw)
    assert y.dtype == torch.float32
    assert torch.allclose(y.mean(0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(4), atol=1e-4)
    assert torch.allclose(s.inverse(y), raw, rtol=1e-5, atol=1e-4)


def test_uint8_scaler_round_trips_and_accepts_integer_tensors():
    x = np.random.randint(0, 256, size=(30, 6)).astype(np.uint8)
    s = Scaler(Preprocessing.fit(x, ["image"], "list"), 6)
    y = s(torch.from_numpy(x))                                      # uint8 in, float32 out
    assert y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 1
    assert torch.allclose(s.inverse(y), torch.from_numpy(x).float(), atol=1e-4)


def test_unit_interval_scaler_clips_out_of_range_inputs():
    # records outside the fitted range must stay valid Bernoulli targets
    pre = Preprocessing.fit(np.array([[0.0], [10.0]]), ["a"], "scalars", scaling="minmax")
    y = Scaler(pre, 1)(torch.tensor([[-5.0], [5.0], [20.0]]))
    assert y.flatten().tolist() == [0.0, 0.5, 1.0]


def test_empty_preprocessing_is_the_identity():
    s = Scaler(Preprocessing(), 3)
    x = torch.randn(4, 3)
    assert torch.equal(s(x), x) and torch.equal(s.inverse(x), x)


def test_scaler_refuses_a_dimension_mismatch():
    pre = Preprocessing(offset=[0.0, 0.0], scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="2 features, model expects 3"):
        Scaler(pre, 3)


def test_scaler_buffers_are_not_in_the_state_dict():
    # the numbers live in the config, so checkpoints do not carry (and cannot disagree with) them
    s = Scaler(Preprocessing(offset=[1.0], scale=[2.0]), 1)
    assert dict(s.state_dict()) == {}


# --- serialisation ----------------------------------------------------------------------------------

def test_to_dict_from_dict_round_trip_through_json():
    x = np.random.randn(40, 3)
    pre = Preprocessing.fit(x, ["a", "b", "c"], "scalars")
    d = json.loads(json.dumps(pre.to_dict()))                       # plain data only, no numpy scalars
    back = Preprocessing.from_dict(d)
    assert back == pre
    assert torch.equal(Scaler(back, 3)(torch.tensor(x)), Scaler(pre, 3)(torch.tensor(x)))


def test_input_dtypes_are_recorded_and_old_configs_default_to_float32():
    pre = Preprocessing.fit(np.zeros((4, 2)), ["a", "b"], "scalars", dtypes=["float64", np.dtype("int32")])
    back = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back.dtypes == ["float64", "int32"] and back.input_dtype("b") == np.dtype("int32")
    old = {k: v for k, v in pre.to_dict().items() if k != "dtypes"}     # a model from before the field
    assert Preprocessing.from_dict(old).input_dtype() == np.dtype("float32")
    with pytest.raises(ValueError, match="do not match features"):
        Preprocessing(features=["a", "b"], layout="scalars", dtypes=["uint8"])
