"""Progress display: the rate column reads naturally at both ends of the speed range."""

from __future__ import annotations

from types import SimpleNamespace

from spa_rl.progress import RateColumn


def _rate(speed, unit="steps"):
    return RateColumn().render(SimpleNamespace(speed=speed, fields={"unit": unit})).plain


def test_rate_column_switches_to_seconds_per_unit_when_slow():
    assert _rate(None) == "? steps/s"
    assert _rate(12.34, "episodes") == "12.3 episodes/s"
    assert _rate(0.05) == "20.0 s/step"
    assert _rate(0.5, "episodes") == "2.0 s/episode"
