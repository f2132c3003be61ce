"""Our typed errors come back out of Ray's wrappers by type (cause chain), not by message text."""
from __future__ import annotations

import pytest

from pipeline.runtime.errors import BadRecordError, SchemaError, unwrap_ray_error


def test_a_typed_error_raised_in_a_ray_task_is_unwrapped_as_itself(ray_local):
    ray = ray_local

    @ray.remote
    def bad():
        raise SchemaError("in.parquet: column 'image' holds vectors of length 10, the model expects 64")

    with pytest.raises(Exception) as e:
        ray.get(bad.remote())
    got = unwrap_ray_error(e.value)
    assert type(got) is SchemaError                       # the cause, not Ray's dual-class wrapper
    assert str(got) == "in.parquet: column 'image' holds vectors of length 10, the model expects 64"


def test_unwrap_follows_causes_not_message_text():
    inner = BadRecordError("f.parquet: NaN or inf features in 1 record(s), e.g. id=3")
    try:
        try:
            raise inner
        except BadRecordError as exc:
            raise RuntimeError("worker failed") from exc
    except RuntimeError as outer:
        assert unwrap_ray_error(outer) is inner
    # a message that merely mentions an error class is not that error
    plain = RuntimeError("SchemaError: something")
    assert unwrap_ray_error(plain) is plain


def test_ray_data_hands_back_the_udf_error_only_with_raise_original_map_exception(ray_local):
    """Ray Data wraps a UDF's error in UserCodeException, whose cause is lost on the way back to the
    driver; the dataset's own `raise_original_map_exception` (decode sets it) keeps our error."""
    import ray.data

    def bad(batch):
        raise SchemaError("units.parquet: no latent column 'mu'")

    def run(original: bool):
        ds = ray.data.range(4, override_num_blocks=1)
        ds.context.raise_original_map_exception = original
        with pytest.raises(Exception) as e:
            ds.map_batches(bad).take_all()
        return unwrap_ray_error(e.value)

    got = run(True)
    assert type(got) is SchemaError and str(got) == "units.parquet: no latent column 'mu'"
    assert not isinstance(run(False), SchemaError)        # why decode (and encode) must set it
