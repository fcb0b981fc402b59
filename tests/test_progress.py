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


def test_a_non_interactive_run_logs_a_plain_line_a_minute_and_an_interactive_or_quiet_one_does_not(monkeypatch):
    """Under nohup or a batch system rich draws nothing until the bar stops; the bar then prints one line a
    minute (never per unit, never for a transient bar, never on a terminal, where the animated bar shows it)."""
    import io

    from rich.console import Console

    from spa_rl import progress

    def lines(transient: bool = False, **console_args) -> list[str]:
        out = io.StringIO()
        monkeypatch.setattr(progress, "_console", Console(file=out, width=200, **console_args))
        clock = [0.0]
        bar = progress_bar(transient=transient)
        bar.get_time = lambda: clock[0]
        task = bar.add_task("PPO", total=30, unit="steps")
        for _ in range(3):  # three steps of 154 s: a line after each
            clock[0] += 154
            bar.advance(task)
        for _ in range(20):  # twenty fast steps within 40 s: no line
            clock[0] += 2
            bar.advance(task)
        return out.getvalue().splitlines()

    logged = lines()
    assert logged == ["PPO 1/30 steps, 154.0 s/step, elapsed 0:02:34, ETA 1:14:26",
                      "PPO 2/30 steps, 154.0 s/step, elapsed 0:05:08, ETA 1:11:52",
                      "PPO 3/30 steps, 154.0 s/step, elapsed 0:07:42, ETA 1:09:18"]
    assert lines(transient=True) == []
    assert lines(force_terminal=True, force_interactive=True) == []
