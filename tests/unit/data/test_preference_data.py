"""Preference records: every shape a user brings, every reason a pair is rejected, and how a
pair is tokenized and packed (one row, its own spans, no padding between its answers)."""

import json

import numpy as np
import pytest

from ft_ray.config import ModelConfig
from ft_ray.data.formats import CHOSEN, REJECTED, RecordError, alpaca_prompt, detect_format, record_units
from ft_ray.data.records import encode_records, parse_record
from ft_ray.data.tokenize import IGNORE_INDEX, pack_arrays
from ft_ray.models import load_tokenizer
from tests.conftest import DEMO


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def answers(units):
    """(role, prompt text, answer text) of each unit."""
    return [(role, "".join(t for t, trained in segments if not trained),
             "".join(t for t, trained in segments if trained)) for segments, role in units]


def test_trl_prompt_chosen_rejected_strings(tokenizer):
    record = {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}
    assert detect_format(record) == "preference"
    eos = tokenizer.eos_token
    assert answers(record_units(record, "auto", tokenizer)) == [
        (CHOSEN, "Q: 2+2?\nA:", " 4" + eos), (REJECTED, "Q: 2+2?\nA:", " 5" + eos)]


def test_trl_chat_lists_render_with_the_template(tokenizer):
    record = {"prompt": [{"role": "user", "content": "Say hi"}],
              "chosen": [{"role": "assistant", "content": "Hi there!"}],
              "rejected": [{"role": "assistant", "content": "No."}]}
    (c_role, c_prompt, c_answer), (r_role, r_prompt, r_answer) = answers(record_units(record, "preference", tokenizer))
    header = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
    assert (c_role, r_role) == (CHOSEN, REJECTED) and c_prompt == r_prompt == header
    assert "Hi there!" in c_answer and "No." in r_answer and "Say hi" not in c_answer


def test_sharegpt_and_alpaca_shapes(tokenizer):
    sharegpt = {"conversations": [{"from": "human", "value": "Say hi"}],
                "chosen": {"from": "gpt", "value": "Hi there!"}, "rejected": {"from": "gpt", "value": "No."}}
    units = answers(record_units(sharegpt, "auto", tokenizer))
    assert "Hi there!" in units[0][2] and "No." in units[1][2] and units[0][1] == units[1][1]
    alpaca = {"instruction": "Greet", "input": "Ada", "chosen": "Hi Ada", "rejected": "Yo"}
    units = answers(record_units(alpaca, "auto", tokenizer))
    assert units[0][1] == units[1][1] == alpaca_prompt("Greet", "Ada")
    assert units[0][2].startswith("Hi Ada") and units[1][2].startswith("Yo")


def test_whole_transcripts_split_at_the_shared_prompt(tokenizer):
    hh = {"chosen": "\n\nHuman: Can you help?\n\nAssistant: Sure, gladly.",
          "rejected": "\n\nHuman: Can you help?\n\nAssistant: Sorry, no."}
    units = answers(record_units(hh, "auto", tokenizer))
    assert units[0][1] == units[1][1] == "\n\nHuman: Can you help?\n\nAssistant: "  # backed up to a word start
    assert units[0][2].startswith("Sure, gladly.") and units[1][2].startswith("Sorry, no.")
    turns = [{"role": "user", "content": "Can you help?"}]
    chat = {"chosen": turns + [{"role": "assistant", "content": "Sure."}],
            "rejected": turns + [{"role": "assistant", "content": "No."}]}
    units = answers(record_units(chat, "auto", tokenizer))
    assert units[0][1] == units[1][1] and "Sure." in units[0][2] and "No." in units[1][2]


def test_kto_shapes(tokenizer):
    good = {"prompt": "Q?", "completion": " Yes.", "label": True}
    assert detect_format(good) == "kto"
    assert answers(record_units(good, "auto", tokenizer)) == [(CHOSEN, "Q?", " Yes." + tokenizer.eos_token)]
    from_csv = {**good, "label": " FALSE"}  # a CSV / TSV cell
    assert answers(record_units(from_csv, "auto", tokenizer)) == [(REJECTED, "Q?", " Yes." + tokenizer.eos_token)]
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Go away"}],
            "label": False}
    [(role, prompt, answer)] = answers(record_units(chat, "auto", tokenizer))
    assert role == REJECTED and "Hello" in prompt and "Go away" in answer and "Hello" not in answer


@pytest.mark.parametrize("record, kind", [
    ({"prompt": "Q", "chosen": "A"}, "missing_field"),
    ({"prompt": "Q", "rejected": "A"}, "missing_field"),
    ({"prompt": "Q", "chosen": "Same", "rejected": "Same"}, "identical_pair"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "B"}, "empty_field"),
    ({"prompt": "Q", "chosen": 3, "rejected": "B"}, "wrong_type"),
    ({"chosen": "Totally different", "rejected": "Another text"}, "no_shared_prompt"),
    ({"chosen": "Same text", "rejected": "Same text"}, "identical_pair"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "human", "value": "A"},
      "rejected": {"from": "gpt", "value": "B"}}, "unknown_role"),
    ({"prompt": "Q", "completion": "A", "label": "yes"}, "wrong_type"),
    ({"prompt": "Q", "label": True}, "missing_field"),
    ({"messages": [{"role": "user", "content": "Q"}], "label": True}, "no_assistant"),
])
def test_bad_pairs_are_rejected_with_the_reason(tokenizer, record, kind):
    with pytest.raises(RecordError) as caught:
        record_units(record, "auto", tokenizer)
    assert caught.value.kind == kind


def test_a_pair_is_two_sequences_each_with_its_own_leading_token_and_masked_prompt(tokenizer):
    line = (DEMO / "preference-train.jsonl").read_text().splitlines()[0]
    example = parse_record(line, "", "auto", {}, tokenizer, 512, None)
    ids, labels, roles = (np.array(example[k]) for k in ("input_ids", "labels", "roles"))
    assert set(roles) == {CHOSEN, REJECTED} and roles[0] == CHOSEN and roles[-1] == REJECTED
    split = int(np.argmax(roles == REJECTED))
    assert ids[0] == ids[split] == tokenizer.bos_token_id
    assert labels[0] == labels[split] == IGNORE_INDEX
    record = json.loads(line)
    for part, answer in ((slice(0, split), record["chosen"]), (slice(split, None), record["rejected"])):
        trained = [t for t, label in zip(ids[part], labels[part]) if label != IGNORE_INDEX]
        assert tokenizer.decode(trained).replace(tokenizer.eos_token, "").strip() == answer.strip()


def test_long_pairs_get_half_the_row_each_and_truncation_can_make_them_identical(tokenizer):
    long = " ".join(["word"] * 60)  # 180 tokens
    pair = json.dumps({"prompt": "Q:", "chosen": long + " yes", "rejected": long + " no"})
    batch = encode_records([pair], [""], "auto", {}, tokenizer, 512, None)
    chosen, rejected = np.bincount(batch.roles)[1:].tolist()
    assert batch.errors == [None] and 180 < chosen <= 256 and 180 < rejected <= 256
    cut = encode_records([pair], [""], "auto", {}, tokenizer, 256, None)  # 128 tokens each: the same words
    assert cut.errors[0].kind == "identical_pair"
    dropped = encode_records([pair], [""], "auto", {}, tokenizer, 512, 256)
    assert dropped.errors[0].kind == "overlong"


def test_packing_keeps_a_pair_in_one_row_with_positions_restarting_at_the_rejected_answer(tokenizer):
    lines = (DEMO / "preference-train.jsonl").read_text().splitlines()[:9]
    batch = encode_records(lines, [""] * 9, "auto", {}, tokenizer, 512, None)
    packed = pack_arrays(batch.ids, batch.labels, batch.offsets, np.arange(9), 512, tokenizer.pad_token_id,
                         roles=batch.roles)
    roles, positions = packed["roles"], packed["position_ids"]
    assert int((roles > 0).sum()) == len(batch.ids)  # every token packed once
    for row_roles, row_positions in zip(roles, positions):
        starts = row_roles[row_positions == 0]
        spans = starts[starts > 0].tolist()
        assert spans == [CHOSEN, REJECTED] * (len(spans) // 2)  # whole pairs, chosen first
    assert int(((positions == 0) & (roles == CHOSEN)).sum()) == 9
