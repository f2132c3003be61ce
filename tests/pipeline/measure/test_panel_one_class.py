"""The one-class panel (pipeline.measure.panel_one_class): `encode --score`'s AUC of the default recipe."""
from __future__ import annotations

import pytest

from pipeline.measure import panel, panel_one_class
from vae.anomaly import SCORES


def test_one_class_run_scores_the_held_out_part_by_every_kind_encode_has(seed, capsys):
    r = panel_one_class.any_data_one_class(("digits-0-16",), (0, 99), seed=0, epochs=40)   # 99: absent
    (row,) = r["rows"]
    assert row["normal"] == 0 and row["train"] < 200                 # trained on class 0's records alone
    assert set(row["auc"]) == {*SCORES, "isolation_forest"} and row["score_auto"] in SCORES
    # zeros are the easiest digit: every score, and the baseline, ranks most other digits above them
    assert all(0.9 < v <= 1 for v in row["auc"].values()), row["auc"]
    assert r["mean"]["digits-0-16"] == row["auc"]
    assert "digits-0-16 normal 0" in capsys.readouterr().out
    assert "digits-0-16 | 0 |" in panel_one_class.summary(r)


def test_a_set_without_labels_or_with_too_few_records_of_the_class_is_named():
    (patches,) = panel.panel_sets(("patches16-china",))
    with pytest.raises(ValueError, match="patches16-china has no labels"):
        panel_one_class.normal_class(patches, 0)
    (digits,) = panel.panel_sets(("digits-0-16",))
    digits.y_train[digits.y_train == 3] = 4
    digits.y_train[:5] = 3
    with pytest.raises(ValueError, match="class 3 has 5 training records"):
        panel_one_class.normal_class(digits, 3)
