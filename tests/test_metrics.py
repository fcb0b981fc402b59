"""Metrics of played episodes: Pass@k against brute force, cell accuracy, world-model accuracy by hand."""

from __future__ import annotations

import itertools

import pytest

from spa_rl.metrics import cell_accuracy, normalize_state, pass_at_k, world_model_metrics


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_cell_accuracy_and_normalisation():
    true = "#####\n#P_O#\n#####\nPlayer (P) is at (1,1); ..."
    assert cell_accuracy(true, true) == 1.0
    assert cell_accuracy("#####\n#_PO#\n#####", true) == pytest.approx(13 / 15)
    assert cell_accuracy(None, true) == 0.0 and cell_accuracy("#xyz", true) == pytest.approx(1 / 15)
    assert cell_accuracy("1 . 3\n2 2 2", "1 2 3\n2 2 2") == pytest.approx(5 / 6)
    assert normalize_state("  ##\n\n #P  \n") == "##\n#P"


def test_world_model_metrics_by_hand():
    """Three turns: right about a change, wrong about a change (copied the state), garbage on a no-op turn."""
    m = world_model_metrics([("a\nb", "a\nc", "a\nb", "a\nc"), ("a\nb", "a\nb", "a\nb", "a\nc"),
                             ("x", "y", "a\nb", "a\nb")])
    assert m["observation_exact"] == pytest.approx(2 / 3) and m["observation_cell_acc"] == pytest.approx(2 / 3)
    assert m["prediction_exact"] == pytest.approx(1 / 3) and m["prediction_cell_acc"] == pytest.approx(0.5)
    assert m["changed_turns"] == 2
    assert m["prediction_exact_changed"] == 0.5 and m["prediction_cell_acc_changed"] == 0.75
    assert m["copy_exact_baseline"] == pytest.approx(1 / 3) and m["copy_cell_acc_baseline"] == pytest.approx(2 / 3)
    assert world_model_metrics([])["prediction_exact"] == 0.0
    assert world_model_metrics([("a", "a", "a", "a")])["prediction_exact_changed"] is None
