"""The text protocol: prompts the agent reads and the parser of what it writes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from spa_rl import envs
from spa_rl.prompts import first_messages, format_response, parse_response, turn_message

WM = ("<think> <observation>\n######\n#P_X_#\n</observation> push it right <prediction>\n######\n#_PX#\n"
      "</prediction> </think> <answer> Right || right </answer>")


def test_parse_world_model_response():
    p = parse_response(WM)
    assert p.format_ok and p.actions == ["Right", "right"]
    assert p.observation == "######\n#P_X_#" and p.prediction == "######\n#_PX#"
    assert p.reasoning == "push it right"


def test_parse_plain_response_and_format_rules():
    assert parse_response("<think>go</think> <answer>Up || Left</answer>", "plain").format_ok
    # plain text is not the world-model format: its observation and prediction are missing
    assert not parse_response("<think>go</think> <answer>Up</answer>", "world-model").format_ok
    bad = [
        "Up",                                                            # no tags at all
        "<think>x</think>",                                              # no answer
        "<answer>Up</answer>",                                           # no think
        "<think>x</think> <answer> </answer>",                           # empty answer
        "<think>x</think> <answer>Up</answer> and more",                 # text after the answer
        "<think>x</think> <answer>Up</answer><answer>Down</answer>",     # two answers
        WM.replace("<prediction>", "").replace("</prediction>", ""),     # prediction missing
        WM.replace("<observation>", "<observation><observation>"),       # nested tag
    ]
    for text in bad:
        fmt = "plain" if "observation" not in text else "world-model"
        assert not parse_response(text, fmt).format_ok, text


def test_fields_are_extracted_even_when_the_format_is_broken():
    p = parse_response("I think <observation>a</observation> then <answer>Down || Up</answer> ok")
    assert not p.format_ok and p.observation == "a" and p.actions == ["Down", "Up"]


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="<>/thinkobservationpredictionanswer |\n"),
                 st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<observation>",
                                           "</observation>", "<prediction>", "</prediction>", "Up", " || ",
                                           "\n", "x"]), max_size=20).map("".join)),
       st.sampled_from(["world-model", "plain"]))
def test_parser_never_raises(text, fmt):
    p = parse_response(text, fmt)
    assert isinstance(p.actions, list) and all(isinstance(a, str) and a for a in p.actions)
    assert isinstance(p.format_ok, bool) and isinstance(p.reasoning, str)


def test_parser_accepts_non_text():
    for junk in (None, 3, b"<think>x</think><answer>Up</answer>", ["x"]):
        assert isinstance(parse_response(junk).actions, list)


def test_format_response_round_trips():
    text = format_response("##\n#P", "go", "##\nP#", ["Left", "Up"])
    p = parse_response(text)
    assert p.format_ok and (p.observation, p.prediction, p.actions, p.reasoning) == ("##\n#P", "##\nP#",
                                                                                      ["Left", "Up"], "go")


def test_instruction_lists_the_variant_vocabulary():
    alt = envs.make("sokoban-altvocab").unwrapped
    text = alt.instruction("grid", 5)
    assert "W: wall, .: empty, G: target, C: box on target, B: box, A: player, @: player on target" in text
    assert "(row,col)" not in text
    perm = envs.make("sokoban-permuted-actions").unwrapped
    assert "Your available actions are:\nUp, Down, Left, Right" in perm.instruction("grid+coords", 5)
    assert "slippery" in envs.make("frozenlake").unwrapped.instruction("grid", 5)
    assert "slippery" not in envs.make("frozenlake-det").unwrapped.instruction("grid", 5)
    assert "2,3,4 writes 4 in row 2, column 3" in envs.make("sudoku").unwrapped.instruction("grid", 5)


def test_turn_messages_match_the_spec():
    env = envs.make("sokoban", render="grid+coords").unwrapped
    obs, _ = env.reset(seed=0)
    msgs = first_messages(env, obs, "grid+coords", "world-model", 5, 10, 200)
    assert msgs[0] == {"role": "system", "content": "You're a helpful assistant."}
    assert f"Turn 1:\nState:\n{obs}\nYou have 10 actions left. Always output: <think> <observation>" in msgs[1][
        "content"]
    assert 'You can make up to 5 actions, separated by the action separator " || ".' in msgs[1]["content"]
    nxt = turn_message(2, obs, 7, "plain", 200, reward=-0.1)
    assert nxt.startswith(f"Reward:\n-0.1\n\nTurn 2:\nState:\n{obs}\nYou have 7 actions left. Always output: "
                          "<think> [your reasoning] </think> <answer>")
