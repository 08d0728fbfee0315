"""Tokenizers shipped with checkpoints: tokenizer.json (built here with the tokenizers library)
and tokenizer.model (trained here with sentencepiece), found beside the weights, carried into
the native format, or given explicitly; specials come from the model config."""

import io
import json

import pytest
import sentencepiece as spm
import torch
from layouts import SMDM_TINY, smdm_state, write_llada
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from adaptive_loop import (
    TokenizerError,
    UsageError,
    attach_tokenizer,
    generate,
    load_model,
    save_model,
    tokenizer_for,
)
from adaptive_loop.policies import make
from adaptive_loop.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    from_spec,
    load_tokenizer,
)

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot",
             "cats and dogs play"] * 5


def _tokenizer_json(directory):
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(directory / "tokenizer.json"))
    return tok


def _tokenizer_model(directory):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=buf,
                                   vocab_size=30, model_type="unigram", hard_vocab_limit=False,
                                   minloglevel=2)
    (directory / "tokenizer.model").write_bytes(buf.getvalue())


def test_tokenizer_json_beside_llada_weights_and_through_native(tmp_path):
    write_llada(tmp_path / "llada")
    reference = _tokenizer_json(tmp_path / "llada")
    model = load_model(tmp_path / "llada", device="cpu")
    tok = tokenizer_for(model)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("the cat sat") == reference.encode("the cat sat").ids
    assert (tok.mask_id, tok.eos_id, tok.pad_id) == (39, 37, 37)  # from config.json
    assert tok.decode(tok.encode("the cat sat") + [39, 37]) == "the cat sat"
    save_model(model, tmp_path / "native")
    assert (tmp_path / "native" / "tokenizer.json").is_file()
    again = load_model(tmp_path / "native", device="cpu")
    assert tokenizer_for(again).encode("a dog") == tok.encode("a dog")
    out = generate(again, ["the cat", "a dog ran in the"], policy=make("fixed"), gen_length=4,
                   steps=4)
    assert len(out.text) == 2 and out.prompt_lengths == [2, 5]
    # the file is read once per model: later calls get the same tokenizer, until the config
    # that describes it changes
    assert tokenizer_for(again) is tokenizer_for(again)
    first = tokenizer_for(again)
    again.config.eos_id = 38
    assert tokenizer_for(again) is not first and tokenizer_for(again).eos_id == 38


def test_a_tokenizer_json_saved_with_truncation_or_padding_encodes_whole(tmp_path):
    """As transformers' plain `tokenizer(text)`: a file's saved truncation and padding are
    off, so a prompt is neither cut nor padded with ids of its own."""
    tok = _tokenizer_json(tmp_path)
    want = tok.encode("the cat sat on the mat").ids
    tok.enable_truncation(max_length=3)
    tok.enable_padding(length=12, pad_id=0, pad_token="[UNK]")
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path, mask_id=40)
    assert ours.encode("the cat sat on the mat") == want and len(want) == 6


def test_sentencepiece_model_beside_smdm_weights(tmp_path):
    save_file(smdm_state(SMDM_TINY), str(tmp_path / "w.safetensors"))
    (tmp_path / "lit_config.json").write_text(json.dumps(SMDM_TINY))
    _tokenizer_model(tmp_path)
    model = load_model(tmp_path / "w.safetensors", device="cpu")
    tok = tokenizer_for(model)
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode("the cat sat")
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert ids == [processor.bos_id(), *processor.EncodeAsIds("the cat sat")]  # as Llama's
    assert tok.decode(ids) == "the cat sat"
    assert tok.decode(ids + [model.config.mask_id]) == "the cat sat"  # mask id is past the vocab


def test_explicit_tokenizer_path(tmp_path, tiny_model):
    _tokenizer_json(tmp_path)
    tok = load_tokenizer(tmp_path, mask_id=16)
    assert isinstance(tok, HFTokenizer)
    out = generate(tiny_model, ["the cat", "dog"], policy=make("fixed"), gen_length=4, steps=4,
                   tokenizer=tok)
    assert out.tokens.shape == (2, 6) and len(out.text) == 2


@pytest.mark.parametrize("make_file", [_tokenizer_json, _tokenizer_model])
def test_text_that_is_not_unicode_is_refused_in_one_line(tmp_path, make_file):
    """Bytes that are not UTF-8 reach Python as lone surrogates, which neither file tokenizer
    can take: the prompt is named instead of the library's type error."""
    make_file(tmp_path)
    tok = load_tokenizer(tmp_path, mask_id=40)
    assert tok.encode("the cat")
    with pytest.raises(UsageError, match=r"is not valid text at character 4 \(bytes that"):
        tok.encode("the \udcff cat")


@pytest.mark.parametrize("setup, message", [
    ("empty", "no tokenizer.json or tokenizer.model"),
    ("missing", "tokenizer not found"),
    ("garbage", "not a readable tokenizer.json"),
])
def test_tokenizer_errors(tmp_path, setup, message):
    path = tmp_path
    if setup == "missing":
        path = tmp_path / "nope.json"
    elif setup == "garbage":
        path = tmp_path / "tokenizer.json"
        path.write_text("{not json")
    # a file that is there but unreadable is a bad file (exit 1, as a corrupt checkpoint's);
    # a path that is not there, a bad argument (exit 2)
    error = TokenizerError if setup == "garbage" else UsageError
    with pytest.raises(error, match=message) as caught:
        load_tokenizer(path, mask_id=0)
    assert caught.value.exit_code == (1 if setup == "garbage" else 2)


def test_load_tokenizer_checks_its_arguments(tmp_path):
    for args, message in [((None, 0), "a tokenizer is a path"), (("", 0), "got ''"),
                          ((tmp_path, "x"), "mask_id must be a token id"),
                          ((tmp_path, -1), "mask_id must be a token id .* got -1"),
                          ((tmp_path, 0, None, 2.0), "eos_id must be a token id")]:
        with pytest.raises(UsageError, match=message):
            load_tokenizer(*args)


def test_model_without_tokenizer_asks_for_one(tmp_path):
    write_llada(tmp_path / "l")
    model = load_model(tmp_path / "l", device="cpu")
    with pytest.raises(UsageError, match="--tokenizer"):
        generate(model, ["hello"], policy=make("fixed"), gen_length=4, steps=4)
    out = generate(model, torch.tensor([[1, 2, 3]]), policy=make("fixed"), gen_length=4, steps=4)
    assert out.text == [] and out.tokens.shape == (1, 7)
    (tmp_path / "tok").mkdir()
    _tokenizer_json(tmp_path / "tok")
    assert attach_tokenizer(model, tmp_path / "tok") is model
    assert tokenizer_for(model) is model.tokenizer and model.tokenizer.mask_id == \
        model.config.mask_id
    out = generate(model, ["the cat"], policy=make("fixed"), gen_length=4, steps=4)
    assert out.tokens.shape == (1, 6) and len(out.text) == 1
    ids = generate(model, [model.tokenizer.encode("the cat")], policy=make("fixed"),
                   gen_length=4, steps=4)  # id prompts read in the model's tokenizer too
    assert torch.equal(ids.tokens, out.tokens) and ids.text == out.text


def test_a_char_tokenizer_spec_takes_the_models_ids_and_a_bad_one_fails_in_one_line():
    tok = from_spec({"kind": "char", "chars": "ab"}, None, {"mask": 2, "pad": None})
    assert (tok.mask_id, tok.encode("ba")) == (2, [1, 0])
    assert from_spec({"kind": "char", "chars": "ab", "specials": {"mask": 2, "eos": 3}}, None,
                     {"mask": 2}).eos_id == 3  # an id only the spec names is taken
    assert from_spec({"kind": "char", "chars": "ab", "specials": {"mask": 2, "eos": None}},
                     None, {"mask": 2, "eos": 3}).eos_id == 3  # null: the config's id stands
    # ids that contradict the config, or a character, would decode and mask other tokens
    # than the model does
    with pytest.raises(UsageError, match="mask_id is 2, but its char tokenizer's specials "
                                         "give mask 5"):
        from_spec({"kind": "char", "chars": "ab", "specials": {"mask": 5}}, None, {"mask": 2})
    for spec in ({"kind": "char"}, {"kind": "char", "chars": 7},
                 {"kind": "char", "chars": "ab", "specials": [1]}):
        with pytest.raises(UsageError, match='char tokenizer needs "chars"'):
            from_spec(spec, None, {"mask": 2})


@pytest.mark.parametrize("build", [_tokenizer_json, _tokenizer_model])
def test_a_completion_reads_right_after_its_prompt(tmp_path, build):
    """A word-level or sentencepiece tokenizer drops the space that starts a completion when it
    decodes it alone; decoded after its prompt, prompt + completion is the whole text."""
    from adaptive_loop.sampler import _decode

    build(tmp_path)
    tok = load_tokenizer(tmp_path, mask_id=99)
    prompt, rest = tok.encode("the cat"), tok.encode("sat on the mat")
    whole = tok.decode(prompt + rest)
    assert tok.decode(prompt) + tok.decode(rest) != whole  # the space is lost alone
    text = _decode(tok, torch.tensor([rest]), None, [prompt])[0]
    assert tok.decode(prompt) + text == whole


def test_a_char_tokenizer_special_id_that_is_a_character_is_a_config_error(tiny_model):
    mask = tiny_model.config.mask_id
    tiny_model.config.tokenizer = {"kind": "char", "chars": "abcdefghijklmnopq"[:mask + 1]}
    with pytest.raises(UsageError, match=f"special id {mask} is also its character "):
        tokenizer_for(tiny_model)


def test_a_char_tokenizer_wider_than_the_embedding_is_a_config_error(tiny_model):
    tiny_model.config.tokenizer = {"kind": "char", "chars": "abcdefghijklmnopqrstuvwxyz"}
    with pytest.raises(UsageError, match=r"the model config's tokenizer spans 26 ids .* more "
                                         r"than the 17 this model embeds$"):
        tokenizer_for(tiny_model)


def test_a_custom_tokenizer_must_give_integer_ids():
    from adaptive_loop import LoopMDM, LoopMDMConfig

    class Floats:
        def encode(self, text):
            return [1.0, 2.0]

        def decode(self, ids):
            return ""

    class NumpyInts(Floats):
        def encode(self, text):
            import numpy as np

            return [np.int64(1), np.int32(2)]

    model = LoopMDM(LoopMDMConfig.from_name("tiny"))
    with pytest.raises(UsageError, match=r"encode must return a list of integer token ids; "
                       r"for prompt 1 it returned list \[1.0, 2.0\]"):
        generate(model, ["x"], policy=make("fixed"), gen_length=2, steps=1, tokenizer=Floats())
    out = generate(model, ["x"], policy=make("fixed"), gen_length=2, steps=1,
                   tokenizer=NumpyInts())
    assert out.tokens[0, :2].tolist() == [1, 2]


def test_prompts_with_text_the_tokenizer_cannot_write_are_noted(tmp_path):
    """A word-level or sentencepiece file reads what it does not know as its unknown token:
    the note counts such prompts; a byte-level BPE (no unknown token) and the char tokenizer
    (which refuses) never note."""
    from adaptive_loop.tokenizer import unknown_note

    _tokenizer_json(tmp_path)
    _tokenizer_model(tmp_path)
    word = HFTokenizer(tmp_path / "tokenizer.json", mask_id=99)
    piece = SentencePieceTokenizer(tmp_path / "tokenizer.model", mask_id=99)
    assert word.unknown == (word._tok.token_to_id("[UNK]"), "[UNK]")
    assert unknown_note(word, ["the cat sat", "the dog"]) is None
    assert unknown_note(word, ["the cat sat", "the zebra"]).startswith(
        "1 of 2 prompts holds text the tokenizer cannot write (it reads as '[UNK]')")
    assert unknown_note(piece, ["the cat", "the dog"]) is None
    assert unknown_note(piece, ["the cat", "日本"]).startswith("1 of 2 prompts holds text")
    bpe = Tokenizer(models.BPE())
    bpe.save(str(tmp_path / "bpe.json"))
    assert HFTokenizer(tmp_path / "bpe.json", mask_id=0).unknown is None
    assert unknown_note(tokenizer_for(load_model()), ["12+34="]) is None


@pytest.mark.parametrize("make_file, name", [(_tokenizer_json, "tokenizer.json"),
                                             (_tokenizer_model, "tokenizer.model")])
def test_an_attached_tokenizer_is_saved_with_the_model(tmp_path, make_config, make_file, name):
    """save_model writes the tokenizer attach_tokenizer gave the model (it wrote the
    config's, so the saved model could not read text)."""
    from adaptive_loop import LoopMDM

    model = LoopMDM(make_config(vocab_size=64, mask_id=63)).eval()
    (tmp_path / "tok").mkdir()
    make_file(tmp_path / "tok")
    attach_tokenizer(model, tmp_path / "tok" / name)
    saved = load_model(save_model(model, tmp_path / "m"))
    assert (tmp_path / "m" / name).is_file() and saved.config.tokenizer["file"] == name
    assert tokenizer_for(saved).encode("the cat") == tokenizer_for(model).encode("the cat")
