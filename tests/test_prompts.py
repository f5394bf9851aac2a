import json

import pytest

from decoders.prompts import PROMPT_SETS, load_prompts


@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_set_loads_non_empty_strings(name):
    prompts = load_prompts(name)
    assert len(prompts) >= 40
    assert all(isinstance(p, str) and p.strip() == p and p for p in prompts)
    assert len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_deterministic_and_seeded(name):
    assert load_prompts(name, seed=3) == load_prompts(name, seed=3)
    assert load_prompts(name, seed=3) != load_prompts(name, seed=4)
    if name != "chat_mix":  # the mix draws different members per seed; single sets only reorder
        assert sorted(load_prompts(name, seed=3)) == sorted(load_prompts(name, seed=4))


def test_limit_is_a_prefix():
    full = load_prompts("harmbench", seed=1)
    assert load_prompts("harmbench", limit=5, seed=1) == full[:5]
    assert load_prompts("harmbench", limit=0) == []
    assert len(load_prompts("realtoxicity", limit=10_000)) == len(load_prompts("realtoxicity"))
    with pytest.raises(ValueError):
        load_prompts("harmbench", limit=-1)


def test_expected_sources_and_shapes():
    assert len(load_prompts("harmbench")) == 200
    assert len(load_prompts("do_not_answer")) > 900
    assert all(p.startswith("Continue this text: ") for p in load_prompts("realtoxicity"))
    reviews = load_prompts("rotten_tomatoes", limit=50)
    assert all(p.startswith('Write a short review of the movie "') for p in reviews)


def test_chat_mix_composition():
    mix = load_prompts("chat_mix")
    assert len(mix) == 64
    assert sum(p.startswith("Continue this text: ") for p in mix) == 8
    assert sum(p.startswith("Write a short review of the movie") for p in mix) == 8
    assert len(set(mix) & set(load_prompts("harmbench"))) == 4
    assert len(set(mix) & set(load_prompts("do_not_answer"))) == 4


def test_unknown_name_lists_known_sets():
    with pytest.raises(ValueError, match="chat_mix"):
        load_prompts("imdb")


def test_plain_text_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("  First prompt.\n\nSecond prompt?\r\nThird: {not json}\n\n")
    assert load_prompts(str(f)) == ["First prompt.", "Second prompt?", "Third: {not json}"]
    assert load_prompts(str(f), limit=2, seed=5) == ["First prompt.", "Second prompt?"]  # file order, a prefix
    assert load_prompts(str(f), seed=1) == load_prompts(str(f), seed=2)


def test_jsonl_file(tmp_path):
    rows = [{"prompt": "Say hi.", "id": 1}, {"prompt": "Line one\nline two", "tags": ["x"]}]
    for name in ("p.jsonl", "p.txt"):  # by suffix, or by a first line that is a JSON object
        f = tmp_path / name
        f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
        assert load_prompts(str(f)) == ["Say hi.", "Line one\nline two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*\"prompt\""):
        load_prompts(str(bad))
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not JSON"):
        load_prompts(str(bad))


def test_file_errors_and_set_names_win(tmp_path, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(str(empty))
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))
    # A packaged name is the packaged set even if a file of that name is in the working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "everyday").write_text("from a file\n")
    assert load_prompts("everyday") != ["from a file"]
    assert load_prompts("./everyday") == ["from a file"]


def test_heldout_prompts_are_never_training_prompts():
    from decoders.prompts import heldout_prompts, training_prompts

    for name in ("rotten_tomatoes", "realtoxicity"):
        held = heldout_prompts(name)
        assert 0 < len(held) <= 256 and heldout_prompts(name, limit=8) == held[:8]
        for seed in (0, 3):
            assert not set(held) & set(training_prompts(name, seed=seed))
        # seed 0 keeps the order of load_prompts: the shipped value models' training prompts are unchanged
        assert training_prompts(name, limit=100) == load_prompts(name, limit=100)
