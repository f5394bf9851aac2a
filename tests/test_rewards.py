import math
from pathlib import Path

import pytest

from decoders import calibrate
from decoders.rewards import (
    STD_FLOOR, TRANSFORMS, Mixture, MixtureError, Objective, RewardError, brevity_score,
    build_objectives, default_objective_configs, describe, load_reward_stats, log_sigmoid,
    minilm_model_dir, select_top,
)
from server.config import ObjectiveConfig


def fake(name, mean=None, std=None, reference=None, scores=None):
    return Objective(name, lambda p, r: scores or [0.0] * len(r), mean=mean, std=std, reference=reference)


@pytest.fixture
def objs():
    return {"a": fake("a", mean=1.0, std=2.0, reference=0.5), "b": fake("b", mean=0.0, std=0.0)}


# --- transforms -----------------------------------------------------------------------------

def test_raw_transform(objs):
    t, mixed = Mixture({"a": 2.0, "b": 0.5}).combine({"a": [1.0, -3.0], "b": [4.0, 2.0]}, objs)
    assert t == {"a": [1.0, -3.0], "b": [4.0, 2.0]}
    assert mixed == [2.0 * 1.0 + 0.5 * 4.0, 2.0 * -3.0 + 0.5 * 2.0]


def test_standardize_with_std_floor(objs):
    t, mixed = Mixture({"a": 1.0, "b": 1.0}, "standardize").combine({"a": [5.0, 1.0], "b": [0.002, 0.0]}, objs)
    assert t["a"] == [2.0, 0.0]
    assert t["b"] == [pytest.approx(0.002 / STD_FLOOR), 0.0]
    assert mixed == [pytest.approx(2.0 + 2.0), 0.0]


def test_log_sigmoid_uses_reference_then_mean(objs):
    t, _ = Mixture({"a": 1.0}, "log_sigmoid").combine({"a": [0.5, 1.5]}, objs)
    assert t["a"][0] == pytest.approx(-math.log(2.0))
    assert t["a"][1] == pytest.approx(math.log(1.0 / (1.0 + math.exp(-1.0))))
    objs["a"].reference = None  # falls back to the mean (1.0)
    t, _ = Mixture({"a": 1.0}, "log_sigmoid").combine({"a": [1.0]}, objs)
    assert t["a"] == [pytest.approx(-math.log(2.0))]


def test_log_sigmoid_is_stable_at_extremes():
    assert log_sigmoid(1000.0, 0.0) == 0.0
    assert log_sigmoid(-1000.0, 0.0) == pytest.approx(-1000.0)
    assert log_sigmoid(40.0, 0.0) == pytest.approx(-math.exp(-40.0), rel=1e-6)


def test_caps_clip_raw_before_transform(objs):
    t, mixed = Mixture({"a": 2.0}, "raw", caps={"a": 0.5}).combine({"a": [3.0, 0.2]}, objs)
    assert t["a"] == [0.5, 0.2] and mixed == [1.0, 0.4]
    t, _ = Mixture({"a": 1.0}, "standardize", caps={"a": 2.0}).combine({"a": [9.0]}, objs)
    assert t["a"] == [0.5]  # (2 - 1) / 2


def test_zero_weight_objectives_are_ignored(objs):
    m = Mixture({"a": 1.0, "b": 0.0})
    assert m.active() == ["a"]
    t, mixed = m.combine({"a": [1.0]}, objs)
    assert list(t) == ["a"] and mixed == [1.0]


def test_combine_rejects_missing_mismatched_and_nan(objs):
    with pytest.raises(ValueError):
        Mixture({"a": 1.0, "b": 1.0}).combine({"a": [1.0]}, objs)
    with pytest.raises(ValueError):
        Mixture({"a": 1.0, "b": 1.0}).combine({"a": [1.0], "b": [1.0, 2.0]}, objs)
    with pytest.raises(RewardError):
        Mixture({"a": 1.0}).combine({"a": [float("nan")]}, objs)


# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("weights,param", [
    ({"a": float("nan")}, "alignment.weights.a"),
    ({"a": float("inf")}, "alignment.weights.a"),
    ({"a": -0.5}, "alignment.weights.a"),
    ({"a": 100.5}, "alignment.weights.a"),
    ({"a": "1"}, "alignment.weights.a"),
    ({"a": True}, "alignment.weights.a"),
    ({"a": 1.0, "nope": 1.0}, "alignment.weights.nope"),
    ({}, "alignment.weights"),
    ({"a": 0.0, "b": 0}, "alignment.weights"),
])
def test_invalid_weights(objs, weights, param):
    with pytest.raises(MixtureError) as err:
        Mixture(weights).validate(objs)
    assert err.value.param == param
    assert isinstance(err.value, ValueError)


def test_unknown_objective_message_lists_known(objs):
    with pytest.raises(MixtureError, match="known objectives: a, b"):
        Mixture({"nope": 1.0}).validate(objs)


def test_valid_weights_and_limits(objs):
    assert Mixture({"a": 100.0, "b": 0.0}).validate(objs).active() == ["a"]
    Mixture({"a": 7}).validate(objs, max_weight=7)
    with pytest.raises(MixtureError):
        Mixture({"a": 8}).validate(objs, max_weight=7)
    Mixture({}).validate(objs, require_nonzero=False)
    with pytest.raises(MixtureError) as err:
        Mixture({"x": 1.0}).validate(objs, param_prefix="extra_body.alignment")
    assert err.value.param == "extra_body.alignment.weights.x"


def test_invalid_transform_and_caps(objs):
    with pytest.raises(MixtureError) as err:
        Mixture({"a": 1.0}, "exp").validate(objs)
    assert err.value.param == "alignment.transform"
    for caps, param in [({"zzz": 1.0}, "alignment.caps.zzz"), ({"b": 1.0}, "alignment.caps.b"),
                        ({"a": float("inf")}, "alignment.caps.a"), ({"a": None}, "alignment.caps.a")]:
        with pytest.raises(MixtureError) as err:
            Mixture({"a": 1.0, "b": 0.0}, caps=caps).validate(objs)
        assert err.value.param == param
    Mixture({"a": 1.0}, caps={"a": -2}).validate(objs)


def test_transforms_need_reference_stats():
    bare = {"x": fake("x"), "m": fake("m", mean=0.0)}
    Mixture({"x": 1.0}, "raw").validate(bare)
    for transform in ("standardize", "log_sigmoid"):
        with pytest.raises(MixtureError, match="'x'") as err:
            Mixture({"x": 1.0}, transform).validate(bare)
        assert err.value.param == "alignment.transform"
    Mixture({"m": 1.0}, "log_sigmoid").validate(bare)  # reference falls back to the mean
    with pytest.raises(MixtureError):
        Mixture({"m": 1.0}, "standardize").validate(bare)
    assert TRANSFORMS == ("raw", "standardize", "log_sigmoid")


# --- selection --------------------------------------------------------------------------------

def test_select_top():
    assert select_top([0.1, 0.9, 0.5, 0.9], 2) == [1, 3]
    assert select_top([1.0, 1.0, 1.0], 2) == [0, 1]
    assert select_top([0.3, float("nan"), -1.0], 3) == [0, 2, 1]
    assert select_top([0.2, 0.1], 5) == [0, 1]
    assert select_top([0.2], 0) == [] and select_top([], 3) == []


# --- objective wrapper and registry -------------------------------------------------------------

def test_objective_batches_and_checks_outputs():
    calls = []

    def score(p, r):
        calls.append(len(r))
        return [float(len(x)) for x in r]

    obj = Objective("len", score, batch_size=2)
    assert obj(["p"] * 5, ["a", "bb", "ccc", "", "e"]) == [1.0, 2.0, 3.0, 0.0, 1.0]
    assert calls == [2, 2, 1]
    with pytest.raises(ValueError):
        obj(["p"], ["a", "b"])
    with pytest.raises(RewardError):
        Objective("bad", lambda p, r: [float("nan")] * len(r))(["p"], ["r"])
    with pytest.raises(RewardError):
        Objective("short", lambda p, r: [])(["p"], ["r"])

    def broken(p, r):
        raise RuntimeError("boom")

    with pytest.raises(RewardError, match="boom"):
        Objective("err", broken)(["p"], ["r"])


def test_default_registry_builds_without_loading_models():
    objs = build_objectives()
    assert list(objs) == ["sentiment", "safety", "relevance", "brevity"]
    kinds = {o["name"]: o["kind"] for o in describe(objs)}
    assert kinds == {"sentiment": "vader", "safety": "profanity", "relevance": "relevance", "brevity": "brevity"}
    desc = {o["name"]: o for o in describe(objs)}
    assert desc["sentiment"]["range"] == [-1.0, 1.0] and desc["safety"]["range"] == [0.0, 1.0]
    assert set(desc["brevity"]) == {"name", "description", "range", "mean", "std", "reference", "kind"}


def test_default_configs_carry_calibrated_stats():
    stats = load_reward_stats()
    if stats is None:
        pytest.skip("decoders/data/reward_stats.json not written yet")
    cfgs = default_objective_configs()
    for name, cfg in cfgs.items():
        assert cfg.mean == stats["objectives"][name]["mean"]
        assert cfg.std > 0 and cfg.reference is not None
    Mixture({n: 1.0 for n in cfgs}, "standardize").validate(build_objectives())


def test_stats_only_fill_matching_kind_and_params():
    if load_reward_stats() is None:
        pytest.skip("no reward stats")
    objs = build_objectives({"brevity": {"kind": "brevity", "params": {"target_words": 10}},
                             "sentiment": {"kind": "vader"},
                             "safety": {"kind": "vader"}})
    assert objs["brevity"].mean is None and objs["safety"].mean is None
    assert objs["sentiment"].mean is not None


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown kind 'python'.*hf_classifier"):
        build_objectives({"x": ObjectiveConfig(kind="python")})
    with pytest.raises(ValueError, match="needs `path`"):
        build_objectives({"x": ObjectiveConfig(kind="hf_classifier")})
    with pytest.raises(ValueError, match="not a model directory"):
        build_objectives({"x": ObjectiveConfig(kind="hf_classifier", path=str(tmp_path))})
    with pytest.raises(ValueError, match="target_words"):
        build_objectives({"x": ObjectiveConfig(kind="brevity", params={"target_words": 0})})
    with pytest.raises(ValueError, match="unknown params"):
        build_objectives({"x": ObjectiveConfig(kind="vader", params={"foo": 1})})
    with pytest.raises(ValueError, match="invalid objective name"):
        build_objectives({"bad name": ObjectiveConfig(kind="vader")})


# --- embedded objectives on obvious texts ---------------------------------------------------------

@pytest.fixture(scope="module")
def defaults():
    return build_objectives()


def test_sentiment(defaults):
    s = defaults["sentiment"](["How was it?"] * 3, ["I love this wonderful day", "I hate this awful day", ""])
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0.0


def test_safety(defaults):
    s = defaults["safety"](["Reply."] * 2, ["You are a fucking idiot and I hate you",
                                             "Thank you so much, have a lovely afternoon"])
    assert 0.0 <= s[0] < 0.5 < s[1] <= 1.0


def test_relevance(defaults):
    prompt = "How do I bake bread at home?"
    s = defaults["relevance"]([prompt] * 3, [
        "Mix flour, water, yeast and salt, knead the dough, let it rise, then bake it in a hot oven.",
        "The stock market closed lower today after weak earnings reports.",
        "   ",
    ])
    assert s[0] > s[1] + 0.3
    assert s[2] == 0.0
    assert all(-1.0 <= x <= 1.0 for x in s)


def test_brevity(defaults):
    short, long_ = "Yes, at noon.", " ".join(["word"] * 200)
    s = defaults["brevity"](["q"] * 4, [short, long_, "", " \n "])
    assert s[0] > s[1] > 0.0
    assert s[2] == s[3] == 0.0 < s[1]
    assert brevity_score(" ".join(["w"] * 50), 50) == 0.5


# --- hf_classifier with tiny random models --------------------------------------------------------

def _save_tiny_bert(path: Path, num_labels: int = 2) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=128,
                        num_labels=num_labels)
    BertForSequenceClassification(config).eval().save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def test_hf_classifier_tiny_bert(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _save_tiny_bert(tmp_path / "rm")
    objs = build_objectives({
        "rm0": ObjectiveConfig(kind="hf_classifier", path=str(path), batch_size=2, params={"max_length": 64}),
        "rm1": ObjectiveConfig(kind="hf_classifier", path=str(path), label_index=1, params={"format": "response"}),
    })
    prompts = ["What is two plus two?", "Name a colour.", "Say hi."]
    responses = ["Four.", "Blue, which is also the colour of a clear sky on a long summer afternoon.", "Hi!"]
    s0 = objs["rm0"](prompts, responses)
    assert len(s0) == 3 and all(math.isfinite(x) for x in s0)
    assert objs["rm0"](prompts[:1], responses[:1]) == pytest.approx(s0[:1], abs=1e-5)  # padding-invariant

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        pair = model(**tok(prompts, responses, padding=True, return_tensors="pt")).logits
        alone = model(**tok(responses, padding=True, return_tensors="pt")).logits
    assert s0 == pytest.approx(pair[:, 0].tolist(), abs=1e-5)
    assert objs["rm1"](prompts, responses) == pytest.approx(alone[:, 1].tolist(), abs=1e-5)
    assert objs["rm0"].low is None and objs["rm0"].high is None


def test_hf_classifier_label_index_out_of_range(tmp_path):
    path = _save_tiny_bert(tmp_path / "rm", num_labels=1)
    obj = build_objectives({"rm": ObjectiveConfig(kind="hf_classifier", path=str(path), label_index=3)})["rm"]
    with pytest.raises(RewardError, match="label_index"):
        obj(["p"], ["r"])


def test_hf_classifier_tiny_llama_chat_template(tmp_path):
    from decoders.base_model import EMBEDDED_DIRNAME
    from decoders.base_model import cache_dir

    embedded = cache_dir() / "models" / EMBEDDED_DIRNAME
    if not (embedded / "tokenizer.json").exists():
        pytest.skip("embedded model not materialized")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded), local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, num_labels=1)
    LlamaForSequenceClassification(config).eval().save_pretrained(str(tmp_path / "rm"))
    tokenizer.save_pretrained(str(tmp_path / "rm"))
    obj = build_objectives({"rm": ObjectiveConfig(kind="hf_classifier", path=str(tmp_path / "rm"))})["rm"]
    prompts = ["Hello?", "Tell me a long story about a dragon."]
    responses = ["Hi.", "Once upon a time a dragon guarded a mountain of gold for a thousand years."]
    both = obj(prompts, responses)
    assert all(math.isfinite(x) for x in both)
    # Decoder-only classifiers pool the last real token: padding in a batch must not change a score.
    assert obj(prompts[:1], responses[:1]) == pytest.approx(both[:1], abs=1e-4)


# --- calibration helpers --------------------------------------------------------------------------

def test_calibrate_summary():
    stats = calibrate.summarize([1.0, 2.0, 3.0, 4.0])
    assert stats["mean"] == 2.5 and stats["median"] == 2.5 and stats["reference"] == 2.5
    assert stats["std"] == pytest.approx(math.sqrt(1.25))
    assert stats["count"] == 4 and stats["min"] == 1.0 and stats["max"] == 4.0
    assert calibrate.quantile([0.0, 10.0], 0.25) == 2.5
    assert calibrate.summarize([5.0], reference_quantile=0.9)["reference"] == 5.0
