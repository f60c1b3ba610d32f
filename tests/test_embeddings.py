"""Textual-inversion embeddings by reference: their vectors reach the text encoders for one request,
as the word the request names them by, in every embedding format, and nothing of them is left after."""

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_archives import data_uri
from lora_files import StaticServer
from safetensors.torch import save, save_file

from sdcog.errors import InputError
from sdcog.fetch import adapter_references
from sdcog.fetch.adapter_cache import AdapterCache, AdapterFile, FetchedAdapters, FetchedEmbedding
from sdcog.generate.cancellation import CancelFlag, Cancelled
from sdcog.generate.engine import Engine
from sdcog.generate.prompt_encoding import text_encoders
from sdcog.resolve.request import resolve_request
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import generation_infotext

PROMPT = "a red circle on a blue background"


pytestmark = pytest.mark.usefixtures("local_urls")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, tmp_path_factory):
    # Real SDXL checkpoints' CLIP configs keep the old eos_token_id of 2, with which transformers pools
    # at the highest token id: an added token's, unless the engine sets the real one. As they do:
    directory = tmp_path_factory.mktemp("sdxl") / "model"
    shutil.copytree(tiny_sdxl, directory)
    for config in directory.glob("text_encoder*/config.json"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token_id": 2}))
    return Engine.load(directory)


def word_vectors(engine, words):
    """The text encoders' input vectors of `words`' tokens: an embedding that stands for those words."""
    vectors = []
    for tokenizer, encoder in text_encoders(engine.pipeline):
        ids = tokenizer(words, add_special_tokens=False).input_ids
        vectors.append(encoder.get_input_embeddings().weight[ids].detach().clone())
    return vectors


def embedding_file(path, engine, words=None, key=None, seed=0, vectors=3):
    """An embedding file for `engine`'s family, in AUTOMATIC1111's format (or diffusers' under
    `key`): the vectors of `words`, or random ones."""
    widths = [encoder.get_input_embeddings().embedding_dim for _, encoder in text_encoders(engine.pipeline)]
    generator = torch.Generator().manual_seed(seed)
    tensors = (
        word_vectors(engine, words)
        if words
        else [torch.randn(vectors, w, generator=generator) for w in widths]
    )
    if len(tensors) == 2:
        save_file({"clip_l": tensors[0], "clip_g": tensors[1]}, path)
    else:
        save_file({key or "emb_params": tensors[0]}, path)
    return adapter_file(path)


def adapter_file(path, name=None):
    path = Path(path)
    return AdapterFile(path, hashlib.sha256(path.read_bytes()).hexdigest(), name or path.stem)


def generate(engine, embeddings=(), prompt=PROMPT, negative_prompt="", cancel=None, steps=3):
    request = resolve_request(
        engine.limits,
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=64,
        height=64,
        num_inference_steps=steps,
        seed=7,
    )
    fetched = FetchedAdapters(embeddings=tuple(FetchedEmbedding(*embedding) for embedding in embeddings))
    generation = engine.generate(request, cancel, fetched)
    return np.asarray(generation.images[0], dtype=np.int16), generation


def state_of(engine):
    """What an embedding could leave behind: each tokenizer's vocabulary, each embedding matrix."""
    return [
        (tokenizer.get_vocab(), encoder.get_input_embeddings().weight.detach().clone())
        for tokenizer, encoder in text_encoders(engine.pipeline)
    ]


def assert_same_state(before, after):
    for (vocab, weights), (vocab_after, weights_after) in zip(before, after, strict=True):
        assert vocab_after == vocab
        assert torch.equal(weights_after, weights)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_an_embedding_of_some_words_vectors_draws_exactly_those_words(family, request, tmp_path):
    engine = request.getfixturevalue(family)
    reference, _ = generate(engine, prompt=PROMPT)
    file = embedding_file(tmp_path / "redcircle.safetensors", engine, words="red circle")
    # Two vectors for one word; written with capitals, as CLIP lowercases prompts.
    drawn, generation = generate(engine, [(file, None)], prompt="a RedCircle on a blue background")
    assert np.array_equal(drawn, reference)
    assert [(e.name, e.vectors) for e in generation.embeddings] == [("redcircle", 2)]
    # The same through the windowed encoder (a weighted prompt past 75 tokens).
    long_words = ", ".join(["(a red circle on a blue background:1.0)"] * 12)
    long_reference, _ = generate(engine, prompt=long_words)
    long_drawn, _ = generate(engine, [(file, None)], prompt=long_words.replace("red circle", "redcircle"))
    assert np.array_equal(long_drawn, long_reference)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_an_embedding_changes_only_its_request_and_leaves_nothing_behind(family, request, tmp_path):
    engine = request.getfixturevalue(family)
    before = state_of(engine)
    base, _ = generate(engine, prompt="a badhands circle")
    file = embedding_file(tmp_path / "badhands.safetensors", engine, seed=1)
    styled, generation = generate(engine, [(file, None)], prompt="a badhands circle")
    assert np.abs(styled - base).mean() > 2
    assert generation.embeddings[0].hash == file.sha256[:12]
    weighted, _ = generate(engine, [(file, None)], prompt="a (badhands:1.8) circle")
    assert np.abs(weighted - styled).mean() > 0.5
    negative, _ = generate(engine, [(file, None)], prompt="a badhands circle", negative_prompt="badhands")
    assert np.abs(negative - styled).mean() > 1
    after, _ = generate(engine, prompt="a badhands circle")  # the word is plain text again
    assert np.array_equal(after, base)
    assert_same_state(before, state_of(engine))


def test_the_word_is_matched_whole_and_an_unused_embedding_is_not_recorded(sd15, tmp_path, caplog):
    base, _ = generate(sd15, prompt="badhandsome, badhands-2")
    file = embedding_file(tmp_path / "badhands.safetensors", sd15, seed=1)
    inside_words, generation = generate(sd15, [(file, None)], prompt="badhandsome, badhands-2")
    assert np.array_equal(inside_words, base)
    assert generation.embeddings == []
    assert "'badhands' appears in neither prompt nor negative_prompt" in caplog.text


def test_the_word_comes_from_the_request_then_the_file_then_the_file_name(sd15, tmp_path):
    diffusers_format = embedding_file(tmp_path / "learned_embeds.safetensors", sd15, key="<cat-toy>", seed=2)
    _, generation = generate(sd15, [(diffusers_format, None)], prompt="a <cat-toy> on a table")
    assert [e.name for e in generation.embeddings] == ["<cat-toy>"]
    _, generation = generate(sd15, [(diffusers_format, "toy")], prompt="a toy on a table")
    assert [e.name for e in generation.embeddings] == ["toy"]
    named_by_file = embedding_file(tmp_path / "EasyNegative.safetensors", sd15, seed=3)
    _, generation = generate(sd15, [(named_by_file, None)], prompt=PROMPT, negative_prompt="easynegative")
    assert [e.name for e in generation.embeddings] == ["EasyNegative"]


def test_several_embeddings_at_once_each_where_its_word_is(sd15, tmp_path):
    red = embedding_file(tmp_path / "r.safetensors", sd15, words="red")
    blue = embedding_file(tmp_path / "b.safetensors", sd15, words="blue")
    reference, _ = generate(sd15, prompt=PROMPT)
    drawn, generation = generate(sd15, [(red, "rr"), (blue, "bb")], prompt="a rr circle on a bb background")
    assert np.array_equal(drawn, reference)
    assert [e.name for e in generation.embeddings] == ["rr", "bb"]


@pytest.mark.parametrize(
    ("tensors", "token", "message"),
    [
        (
            {"emb_params": torch.zeros(2, 768)},
            None,
            "is an embedding for SD 1.x \\(768 features\\); this model takes SDXL",
        ),
        (
            {"a.lora_up.weight": torch.zeros(2, 2), "a.lora_down.weight": torch.zeros(2, 2)},
            None,
            "is it a LoRA",
        ),
        ({"emb_params": torch.zeros(80, 32)}, None, "has 80 vectors; an embedding has 1 to 75"),
        ({"emb_params": torch.full((2, 32), float("nan"))}, None, "not finite"),
        ({"emb_params": torch.zeros(2, 32)}, None, "its name 'bad name' cannot be written in a prompt"),
    ],
)
def test_a_file_that_is_no_embedding_for_this_model_fails_naming_the_field(
    sd15, sdxl, tmp_path, tensors, token, message
):
    engine = sdxl if "SDXL" in message else sd15
    path = tmp_path / "bad name.safetensors"
    save_file(tensors, path)
    before = state_of(engine)
    good = embedding_file(tmp_path / "good.safetensors", engine, seed=4)
    with pytest.raises(InputError, match=message) as error:
        generate(engine, [(good, None), (adapter_file(path), token)], prompt="good")
    assert error.value.field == "embeddings"
    assert_same_state(before, state_of(engine))  # nothing added: every file is checked first


@pytest.mark.parametrize(
    ("width", "made_for"),
    [(768, "an embedding for SD 1.x (768 features)"), (48, "an embedding of 48 features")],
)
def test_an_embedding_of_another_width_is_refused_in_plain_words(sd15, tmp_path, width, made_for):
    """The tiny model's width (32) is no family's: "this model takes vectors of 32 features
    embeddings", it read before."""
    save_file({"emb_params": torch.zeros(2, width)}, tmp_path / "wide.safetensors")
    with pytest.raises(InputError) as error:
        generate(sd15, [(adapter_file(tmp_path / "wide.safetensors"), None)], prompt="wide")
    assert str(error.value) == f"embeddings: wide is {made_for}; this model takes embeddings of 32 features"


def test_a_fetched_file_that_is_no_embedding_for_this_model_is_not_kept_in_the_cache(sd15, tmp_path):
    """Issue 16: a file that passed the cache's safetensors check and failed to load stayed."""
    cache = AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**8)
    good, wide = tmp_path / "good.safetensors", tmp_path / "wide.safetensors"
    embedding_file(good, sd15, seed=9)
    save_file({"emb_params": torch.zeros(2, 768)}, wide)
    references = [f"good={data_uri(good.read_bytes())}", f"wide={data_uri(wide.read_bytes())}"]
    request = resolve_request(sd15.limits, prompt="good wide", embeddings=", ".join(references))
    files = cache.fetch_embeddings(request.embeddings)
    with pytest.raises(InputError, match="inline is an embedding for SD 1.x") as error:
        generate(sd15, files, prompt="good wide")
    assert error.value.field == "embeddings"
    kept = {path.name for path in cache.root.glob("*.safetensors")}
    assert kept == {f"{hashlib.sha256(good.read_bytes()).hexdigest()}.safetensors"}
    assert len(json.loads((cache.root / "references.json").read_text())) == 1


def test_two_embeddings_may_not_share_a_word(sd15, tmp_path):
    first = embedding_file(tmp_path / "a.safetensors", sd15, seed=5)
    second = embedding_file(tmp_path / "b.safetensors", sd15, seed=6)
    with pytest.raises(InputError, match="two embeddings are named 'Word'") as error:
        generate(sd15, [(first, "word"), (second, "Word")], prompt="word")
    assert error.value.field == "embeddings"


def test_a_cancelled_request_takes_its_embedding_out_too(sd15, tmp_path):
    before = state_of(sd15)
    cancel = CancelFlag()
    cancel.set()
    file = embedding_file(tmp_path / "gone.safetensors", sd15, seed=7)
    with pytest.raises(Cancelled):
        generate(sd15, [(file, None)], prompt="gone", cancel=cancel)
    assert_same_state(before, state_of(sd15))


def test_the_infotext_lists_the_embeddings_used_as_ti_hashes(sd15, tmp_path):
    file = embedding_file(tmp_path / "EasyNegative.safetensors", sd15, seed=8)
    _, generation = generate(sd15, [(file, None)], negative_prompt="(easynegative:1.2)")
    request = resolve_request(sd15.limits, prompt=PROMPT, seed=1)
    fields = parse_infotext_fields(generation_infotext(request, 1, "tiny", embeddings=generation.embeddings))
    assert fields["TI hashes"] == f"EasyNegative: {file.sha256[:12]}"


def test_references_fetch_embeddings_including_a_replicate_models_pivotal_tuning_file(
    sdxl, tmp_path, monkeypatch
):
    """A Replicate SDXL fine-tune's tar holds its LoRA and its trained tokens (embeddings.pti,
    safetensors with text_encoders_0/1): the embeddings input takes the tokens' file."""
    clip_l, clip_g = word_vectors(sdxl, "red circle")
    pti = save({"text_encoders_0": clip_l, "text_encoders_1": clip_g})
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in (("lora.safetensors", save({"x": torch.zeros(1)})), ("embeddings.pti", pti)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    server = StaticServer({"/owner/fine-tune/_weights": archive.getvalue(), "/tok.safetensors": pti})
    try:
        monkeypatch.setenv(adapter_references.REPLICATE_ENDPOINT_ENV, server.url)
        cache = AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**8)
        request = resolve_request(
            sdxl.limits, prompt="a TOK", embeddings=f"TOK=owner/fine-tune, other={server.url}/tok.safetensors"
        )
        files = cache.fetch_embeddings(request.embeddings)
    finally:
        server.close()
    sha256 = hashlib.sha256(pti).hexdigest()
    assert [(file.sha256, token) for file, token in files] == [(sha256, "TOK"), (sha256, "other")]
    reference, _ = generate(sdxl, prompt=PROMPT)
    drawn, _ = generate(sdxl, files[:1], prompt="a TOK on a blue background")
    assert np.array_equal(drawn, reference)
