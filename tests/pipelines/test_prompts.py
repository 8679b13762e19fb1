"""A1111 prompt syntax: extra networks, emphasis, BREAK, prompt editing, AND, and the weighted chunked conditioning."""

from __future__ import annotations

import pytest
import torch

from pipelines.conditioning import CHUNK, Embedding, PromptEncoder, pad_to_chunks
from pipelines.prompts import (
    HypernetCall,
    LoraCall,
    join_and,
    parse_attention,
    parse_extra_networks,
    prompt_schedule,
    referenced_words,
)
from pipelines.types import InvalidRequestError
from tests.pipelines.test_gen_fixtures import PIPE_FILES, world


def _approx(pairs):
    return [(t, round(w, 4)) for t, w in pairs]


@pytest.mark.parametrize(("text", "expected"), [
    ("a cat", [("a cat", 1.0)]),
    ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
    ("a ((cat))", [("a ", 1.0), ("cat", 1.21)]),
    ("a [cat]", [("a ", 1.0), ("cat", 0.9091)]),
    ("a (cat:1.3) dog", [("a ", 1.0), ("cat", 1.3), (" dog", 1.0)]),
    ("(a (cat:2):0.5)", [("a ", 0.5), ("cat", 1.0)]),
    (r"a \(cat\) \[x\]", [("a (cat) [x]", 1.0)]),
    ("a (cat", [("a ", 1.0), ("cat", 1.1)]),
    ("red BREAK blue", [("red", 1.0), ("BREAK", -1.0), ("blue", 1.0)]),
    ("", [("", 1.0)]),
    ("word:1.2)", [("word:1.2)", 1.0)]),
])
def test_parse_attention_follows_a1111(text, expected):
    assert _approx(parse_attention(text)) == expected


def test_extra_networks_are_removed_and_typed():
    text, nets = parse_extra_networks(
        "a cat <lora:style:0.5> <lora:two:0.2:0.7> <lyco:three:te=0.1:unet=0.9> <hypernet:h:0.3> <lora:plain> <foo:x>")
    assert "<" not in text and text.startswith("a cat")
    assert nets.loras == [LoraCall("style", 0.5, 0.5), LoraCall("two", 0.2, 0.7), LoraCall("three", 0.1, 0.9),
                          LoraCall("plain", 1.0, 1.0)]
    assert nets.hypernets == [HypernetCall("h", 0.3)]
    assert nets.unknown == ["foo"]


def test_extra_network_bad_weight_names_the_tag():
    with pytest.raises(InvalidRequestError, match="<lora:style:abc>") as err:
        parse_extra_networks("<lora:style:abc>")
    assert err.value.field == "prompt"


def test_prompt_editing_and_alternation_schedules():
    assert prompt_schedule("a [cat:dog:0.5]", 10) == [(5, "a cat"), (10, "a dog")]
    assert prompt_schedule("a [cat:dog:3]", 10) == [(3, "a cat"), (10, "a dog")]
    assert prompt_schedule("a [dog:2]", 4) == [(2, "a "), (4, "a dog")]
    assert prompt_schedule("a [cat::2]", 4) == [(2, "a cat"), (4, "a ")]
    assert prompt_schedule("[red|blue] x", 3) == [(1, "red x"), (2, "blue x"), (3, "red x")]
    # emphasis brackets are not schedules and stay for parse_attention
    assert prompt_schedule("a [cat] (dog:1.2)", 5) == [(5, "a [cat] (dog:1.2)")]
    assert prompt_schedule("broken [cat:dog", 5) == [(5, "broken [cat:dog")]


def test_and_is_joined_as_chunks():
    assert join_and("a cat AND a dog:0.5") == ("a cat BREAK a dog", True)
    assert join_and("a cat and a dog") == ("a cat and a dog", False)


def test_referenced_words_match_whole_words_only():
    assert referenced_words("a tipt cat, (tisafe:1.2)", ["tipt", "tisafe", "tixl", "ti"]) == ["tipt", "tisafe"]
    assert referenced_words("atipt", ["tipt"]) == []


# -- conditioning ---------------------------------------------------------------------------------------

def _encoder(kind="sd15", **kwargs) -> PromptEncoder:
    return PromptEncoder(world().pipes[PIPE_FILES[kind]], **kwargs)


def test_long_prompts_are_chunked_by_75_tokens():
    enc = _encoder()
    short = enc.encode("a cat")
    assert short.embeds.shape == (1, 77, 32)
    long = enc.encode("a " * 80 + "cat")  # 81 tokens
    assert long.embeds.shape == (1, 154, 32)
    longer = enc.encode("cat " * 160)
    assert longer.embeds.shape == (1, 77 * 3, 32)
    # the first chunk of a long prompt equals encoding those 75 tokens alone
    first = enc.encode("a " * 75)
    assert torch.allclose(long.embeds[:, :77], first.embeds, atol=1e-5)


def test_break_starts_a_new_chunk():
    enc = _encoder()
    cond = enc.encode("a cat BREAK a dog")
    assert cond.chunks == 2
    assert torch.allclose(cond.embeds[:, :77], enc.encode("a cat").embeds, atol=1e-5)
    assert torch.allclose(cond.embeds[:, 77:], enc.encode("a dog").embeds, atol=1e-5)


def test_comma_backtrack_moves_the_last_words_to_the_next_chunk():
    enc = _encoder()
    tokens_per_word = len(enc.slots[0].tokenizer("cat", add_special_tokens=False).input_ids)
    text = "a " * 70 + ", " + "cat " * 6  # the chunk fills up 6 tokens after the comma
    chunks, _ = enc._chunks(0, text)
    assert tokens_per_word == 1 and len(chunks) == 2
    assert len(chunks[0].tokens) == 71  # 70 words + the comma
    assert len(chunks[1].tokens) == 6


def test_emphasis_weights_tokens_and_keeps_the_mean():
    enc = _encoder()
    plain = enc.encode("a photo of a cat").embeds
    weighted = enc.encode("a photo of a (cat:1.5)").embeds
    assert not torch.equal(plain, weighted)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-5)
    assert torch.equal(enc.encode("a photo of a (cat:1)").embeds, plain)


def test_clip_skip_uses_an_earlier_layer():
    assert not torch.equal(_encoder(clip_skip=2).encode("a cat").embeds, _encoder().encode("a cat").embeds)
    with pytest.raises(InvalidRequestError, match="clip_skip"):
        _encoder(clip_skip=5)


def test_sdxl_reads_the_penultimate_layer_whatever_the_clip_skip_like_a1111():
    plain = _encoder("sdxl").encode("a cat")
    for skip in (2, 3):
        skipped = _encoder("sdxl", clip_skip=skip).encode("a cat")
        assert torch.equal(skipped.embeds, plain.embeds) and torch.equal(skipped.pooled, plain.pooled)


def test_sdxl_concatenates_both_encoders_and_pools_the_first_chunk():
    enc = _encoder("sdxl")
    cond = enc.encode("a cat BREAK a dog")
    assert cond.embeds.shape == (1, 154, 96)
    assert cond.pooled is not None and cond.pooled.shape == (1, 64)
    assert torch.allclose(cond.pooled, enc.encode("a cat").pooled, atol=1e-5)  # batched forward: float noise


def test_negative_is_padded_to_the_same_chunk_count():
    enc = _encoder()
    pos, neg = enc.encode("cat " * 100), enc.encode("ugly")
    padded = pad_to_chunks(neg, pos.chunks, enc.empty())
    assert padded.embeds.shape == pos.embeds.shape
    assert torch.equal(padded.embeds[:, 77:], enc.empty().embeds)


def test_embedding_vectors_replace_the_name_and_expand_to_their_length():
    pipe = world().pipes[PIPE_FILES["sd15"]]
    vectors = torch.randn(3, 32)
    emb = Embedding("zzq", {"clip_l": vectors})
    enc = PromptEncoder(pipe, embeddings={"zzq": emb})
    chunks, used = enc._chunks(0, "a zzq cat")
    assert used == {"zzq"}
    name_tokens = len(enc.slots[0].tokenizer("zzq", add_special_tokens=False).input_ids)
    plain_len = len(enc._chunks(0, "a zzq cat")[0][0].tokens)
    assert plain_len == 1 + 3 + 1  # "a", 3 vectors, "cat"
    assert name_tokens == 3  # byte tokens: the expansion is by vectors, not by name length
    with_emb = enc.encode("a zzq cat")
    without = PromptEncoder(pipe).encode("a zzq cat")
    assert not torch.equal(with_emb.embeds, without.embeds)
    # nothing was added to the tokenizer or the embedding table
    assert len(pipe.tokenizer) == 552
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == 552


def test_embedding_never_straddles_a_chunk():
    pipe = world().pipes[PIPE_FILES["sd15"]]
    enc = PromptEncoder(pipe, embeddings={"zzq": Embedding("zzq", {"clip_l": torch.randn(4, 32)})})
    chunks, _ = enc._chunks(0, "a " * 73 + "zzq")
    assert len(chunks) == 2 and len(chunks[0].tokens) == 73 and chunks[1].fixes[0][0] == 0
    assert len(chunks[0].tokens) <= CHUNK
