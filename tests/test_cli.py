from __future__ import annotations

import subprocess
import sys

import pytest

from spa_rl.cli import main


def test_env_list(capsys):
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("sokoban", "sokoban-10x10-2box", "frozenlake-6x6-det", "sudoku-hard"):
        assert name in out


def test_env_show_both_renders(capsys):
    assert main(["env", "show", "sokoban", "--seed", "4", "--render", "grid"]) == 0
    out = capsys.readouterr().out
    assert "Player (P)" not in out and "optimal solution:" in out
    assert main(["env", "show", "sokoban", "--seed", "4"]) == 0
    assert "Player (P) is at" in capsys.readouterr().out


def test_env_solve_replays_to_success(capsys):
    for name in ("sokoban", "frozenlake-det", "sudoku"):
        assert main(["env", "solve", name, "--seed", "2"]) == 0
        assert capsys.readouterr().out.rstrip().endswith("solved")


def test_env_play_scripted_session(monkeypatch, capsys, tmp_path):
    layout = tmp_path / "level.txt"
    layout.write_text("#######\n#PX_O_#\n#######\n")
    lines = iter(["hint", "Up", "nonsense", "Right || Right", "undo", "Right", "quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert main(["env", "play", "sokoban", "--layout", str(layout)]) == 0
    out = capsys.readouterr().out
    assert "hint: Right" in out and "invalid action 'nonsense'" in out
    assert out.count("solved!") == 2  # solved, undone, solved again


@pytest.mark.parametrize("argv,message", [
    (["env", "show", "nope"], "unknown env 'nope': valid names are sokoban"),
    (["env", "show", "sokoban", "--layout", "/nonexistent/level.txt"], "cannot read layout file"),
])
def test_user_errors_exit_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_layout_file_names_line_and_character(capsys, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("#####\n#P?O#\n#####\n")
    assert main(["env", "show", "sokoban", "--layout", str(bad)]) == 2
    assert "line 2, character 3" in capsys.readouterr().err


def test_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["env", "show", "sokoban", "--render", "pixels"])
    assert e.value.code == 2


def test_demo_runs(capsys):
    assert main(["demo", "--puzzles", "5", "--model-puzzles", "0"]) == 0
    out = capsys.readouterr().out
    assert "solver" in out and "100.0%" in out and "sudoku" in out


@pytest.mark.integration
def test_demo_with_the_embedded_model(capsys):
    assert main(["demo", "--puzzles", "2", "--model-puzzles", "1"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m on sokoban" in out and "prediction_exact" in out


def test_output_closed_by_reader_is_not_an_error():
    """`spa ... | head -1`: the reader closes the pipe before spa writes; spa exits 0 with no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "spa_rl.cli", "train", "--env", "frozenlake", "--out", "x",
                             "--print-config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # closed long before the child has imported torch and has anything to write
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
