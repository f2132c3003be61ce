"""pipeline.runtime.ray_pool on the session's real local Ray: a batch job's actor pool is killed when its run
fails and left to Ray Data when it succeeds (the encode case, with GCS times, is
tests/reliability/test_encode_reliability.py::test_04)."""
from __future__ import annotations

import time

import pytest

from pipeline.runtime.ray_pool import strict_pool_dataset


def _pool_actors(ray) -> dict[str, object]:
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address
    return {a.actor_id: a for a in list_actors(address=gcs, limit=10_000, detail=True, raise_on_missing_output=False)
            if "_FailsOn" in (a.class_name or "")}


def _reason(actor) -> str | None:
    return ((actor.death_cause or {}).get("actor_died_error_context") or {}).get("reason")


def _run(ray, bad: int):
    class _FailsOn:
        """A pool UDF that raises on one item (defined here: the workers cannot import test modules,
        and a local class travels by value)."""

        def __init__(self, bad: int):
            self.bad = bad

        def __call__(self, batch):
            if int(batch["i"][0]) == self.bad:
                raise ValueError(f"item {self.bad} is bad")
            return batch

    ds = strict_pool_dataset(ray.data.from_items([{"i": i} for i in range(6)], override_num_blocks=6))
    return ds.map_batches(_FailsOn, fn_constructor_args=(bad,), batch_size=1,
                          compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5).take_all()


def test_a_failed_run_kills_its_pool_and_a_successful_one_does_not(ray_local):
    ray = ray_local
    before = set(_pool_actors(ray))
    # success: results in input order; the pool is released by Ray Data, not killed
    assert [r["i"] for r in _run(ray, bad=-1)] == list(range(6))
    deadline = time.time() + 30
    while len(ok := set(_pool_actors(ray)) - before) < 2 and time.time() < deadline:
        time.sleep(0.5)   # the GCS lists an actor a moment after its creation
    assert len(ok) == 2, ok                       # ActorPoolStrategy(size=2)
    # failure: the UDF's own error, and both actors killed (not merely unreferenced) while it is held
    with pytest.raises(ValueError, match="item 3 is bad") as e:
        _run(ray, bad=3)
    deadline = time.time() + 30
    while True:   # the failed run's actors (re-listed: one may reach the GCS's table after the error)
        actors = _pool_actors(ray)
        failed = set(actors) - before - ok
        if all(actors[i].state == "DEAD" for i in failed) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert failed
    states = {i: (actors[i].state, _reason(actors[i])) for i in failed}
    # every actor of the failed run is dead while its error is held, and the callback killed them: an
    # actor Ray Data's own shutdown let go a moment before the kill dies unreferenced (REF_DELETED),
    # which a loaded machine shows now and then; none is left alive or dies of anything else
    assert all(state == "DEAD" for state, _ in states.values()), states
    assert {reason for _, reason in states.values()} - {"REF_DELETED"} == {"RAY_KILL"}, states
    assert e.value is not None                    # the error was held throughout
    assert not {_reason(actors[i]) for i in ok} & {"RAY_KILL"}, {i: _reason(actors[i]) for i in ok}
