"""Progress display: a true rate (work over time since the start) and ETA, readable at both ends of the range."""

from __future__ import annotations

from spa_rl.progress import EtaColumn, RateColumn, progress_bar


def _bar_at(clock):
    bar = progress_bar()
    bar.get_time = lambda: clock[0]
    return bar


def test_rate_is_work_over_elapsed_time_even_when_the_work_lands_at_once():
    clock = [100.0]
    bar = _bar_at(clock)
    task = bar.add_task("eval", total=32, unit="episodes")
    t = bar.tasks[0]
    assert RateColumn().render(t).plain == "? episodes/s" and EtaColumn().render(t).plain == "ETA -:--:--"
    clock[0] = 164.0  # one minute of nothing, then every episode finishes in the same instant
    bar.advance(task, 32)
    assert RateColumn().render(bar.tasks[0]).plain == "2.0 s/episode"  # 32 episodes in 64 s, not 32 per instant


def test_rate_switches_to_seconds_per_unit_and_excludes_resumed_work():
    clock = [0.0]
    bar = _bar_at(clock)
    task = bar.add_task("SFT", total=100, completed=40, unit="steps")  # resumed at step 40
    clock[0] = 20.0
    bar.advance(task, 1)  # one step in 20 s, not 41 steps in 20 s
    t = bar.tasks[0]
    assert RateColumn().render(t).plain == "20.0 s/step"
    assert EtaColumn().render(t).plain == "ETA 0:19:40"  # 59 steps left at 20 s each
    clock[0] = 21.0
    bar.advance(task, 59)
    assert RateColumn().render(bar.tasks[0]).plain == "2.9 steps/s"


def test_fractional_progress_that_sums_to_the_total_shows_the_total():
    from spa_rl.progress import CountColumn

    bar = _bar_at([0.0])
    task = bar.add_task("self-play", total=48, unit="episodes")
    for _ in range(48 * 7):  # per-turn fractions of 1/7 episode: their float sum falls just short of 48
        bar.advance(task, 1 / 7)
    assert bar.tasks[0].completed != 48
    assert CountColumn().render(bar.tasks[0]).plain == "48/48"
