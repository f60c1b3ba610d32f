"""LoRAs by reference: fetched from a server on 127.0.0.1, cached by content, applied per request
with no state left for the next one, in kohya and diffusers formats, on SD 1.5 and SDXL."""

import base64
import hashlib
import io
import json
import pickle
import socket
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from hostile_archives import bomb, data_uri, safetensors_header
from lora_files import StaticServer, make_lora
from safetensors.torch import save

from sdcog.errors import InputError
from sdcog.fetch import adapter_references
from sdcog.fetch.adapter_cache import AdapterCache, adapter_tokens
from sdcog.generate.engine import Engine
from sdcog.generate.loras import LoraAdapters
from sdcog.model.acceleration import optimize_modules
from sdcog.model.families import SD1
from sdcog.model.safetensors_files import tensor_data_sha256
from sdcog.model.weights import PROJECT_ROOT
from sdcog.resolve.request import ModelLimits, resolve_request
from sdcog.write.infotext import parse_infotext_fields
from sdcog.write.outputs import generation_infotext, read_infotext
from sdcog_tools.cog_schema import write_schema
from sdcog_tools.cog_server import running_server

pytestmark = pytest.mark.usefixtures("local_urls")


@pytest.fixture(scope="module")
def lora_files(tiny_sd15, tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    files = {
        "/style.safetensors": make_lora(tiny_sd15, root / "style.safetensors", seed=1),
        "/style-kohya.safetensors": make_lora(
            tiny_sd15, root / "style-kohya.safetensors", seed=1, kohya=True
        ),
        "/other.safetensors": make_lora(tiny_sd15, root / "other.safetensors", seed=2),
        "/xl.safetensors": make_lora(tiny_sdxl, root / "xl.safetensors", seed=3, kohya=True),
    }
    for seed in range(10, 22):  # for the switching soak
        files[f"/soak-{seed}.safetensors"] = make_lora(
            tiny_sd15, root / f"soak-{seed}.safetensors", seed=seed
        )
    served = {path: file.read_bytes() for path, file in files.items()}
    width = json.loads((tiny_sd15 / "text_encoder" / "config.json").read_text())["hidden_size"]
    served["/EasyNegative.safetensors"] = save({"emb_params": torch.randn(2, width)})  # an embedding
    return served


@pytest.fixture(scope="module")
def server(lora_files):
    pickled = io.BytesIO()
    pickle.dump({"weights": [1, 2, 3]}, pickled)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        for name, data in (
            ("special_params.json", b"{}"),
            ("lora.safetensors", lora_files["/style.safetensors"]),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    files = dict(lora_files)
    files["/model.ckpt"] = pickled.getvalue()
    files["/truncated.safetensors"] = safetensors_header(1000) + bytes(10)  # the header fits, not the data
    files["/owner/style-model/_weights"] = tar.getvalue()
    served = StaticServer(files)
    yield served
    served.close()


@pytest.fixture
def cache(tmp_path):
    return AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**8)


def generate(
    engine, cache, lora_weights=None, lora_scales=None, prompt="a red circle on a blue background", **inputs
):
    """One 64x64 image (int16 pixels) and its Generation, with the request's adapters fetched and released."""
    request = resolve_request(
        engine.limits,
        prompt=prompt,
        width=64,
        height=64,
        num_inference_steps=4,
        seed=5,
        lora_weights=lora_weights,
        lora_scales=lora_scales,
        **inputs,
    )
    adapters = cache.fetch_for(request)
    try:
        generation = engine.generate(request, adapters=adapters)
    finally:
        cache.release(adapters)
    return np.asarray(generation.images[0], dtype=np.int16), generation


def test_a_lora_changes_the_image_and_scale_0_or_no_lora_gives_exactly_the_base(sd15, cache, server):
    base, _ = generate(sd15, cache)
    styled, generation = generate(sd15, cache, f"{server.url}/style.safetensors")
    assert np.abs(styled - base).mean() > 5
    assert [lora.scale for lora in generation.loras] == [1.0]
    off, _ = generate(sd15, cache, f"{server.url}/style.safetensors", "0")
    assert np.array_equal(off, base)
    after, _ = generate(sd15, cache)  # the adapter stays loaded, but nothing of it may leak
    assert np.array_equal(after, base)


def test_kohya_and_diffusers_files_of_the_same_lora_draw_the_same_image(sd15, cache, server):
    diffusers_format, _ = generate(sd15, cache, f"{server.url}/style.safetensors")
    kohya_format, _ = generate(sd15, cache, f"{server.url}/style-kohya.safetensors")
    assert np.abs(kohya_format - diffusers_format).max() <= 1


def test_two_loras_combine_with_their_own_scales(sd15, cache, server):
    style, other = f"{server.url}/style.safetensors", f"{server.url}/other.safetensors"
    first, _ = generate(sd15, cache, style, "0.8")
    second, _ = generate(sd15, cache, other, "0.5")
    both, generation = generate(sd15, cache, f"{style}, {other}", "0.8, 0.5")
    assert [(lora.name, lora.scale) for lora in generation.loras] == [("style", 0.8), ("other", 0.5)]
    assert np.abs(both - first).mean() > 2 and np.abs(both - second).mean() > 2
    again, _ = generate(sd15, cache, f"{style} {other}", "0.8,0.5")
    assert np.array_equal(both, again)


def test_the_second_request_reads_the_cache_not_the_network(sd15, cache, server, tmp_path):
    url = f"{server.url}/other.safetensors?download=1"
    before = server.count("/other.safetensors")
    generate(sd15, cache, url)
    generate(sd15, cache, url)
    assert server.count("/other.safetensors") == before + 1 and cache.downloads == 1
    # A new server process with the same cache directory: still no download.
    restarted = AdapterCache(cache.root, max_bytes=10**9, max_file_bytes=10**8)
    generate(sd15, restarted, url)
    assert server.count("/other.safetensors") == before + 1 and restarted.downloads == 0


def test_the_cache_removes_the_least_recently_used_files_past_its_size(sd15, server, tmp_path, lora_files):
    size = len(lora_files["/soak-10.safetensors"])
    cache = AdapterCache(tmp_path / "small", max_bytes=int(2.5 * size), max_file_bytes=10**8)
    for seed in (10, 11, 10, 12):  # 10 is used again, so 11 is the least recently used
        generate(sd15, cache, f"{server.url}/soak-{seed}.safetensors")
    kept = {path.stem for path in cache.root.glob("*.safetensors")}
    hashes = {seed: tensor_hash(lora_files[f"/soak-{seed}.safetensors"]) for seed in (10, 11, 12)}
    assert kept == {hashes[10], hashes[12]}


def tensor_hash(data):
    return hashlib.sha256(data).hexdigest()


def test_a_replicate_model_reference_reads_the_lora_out_of_its_weights_tar(sd15, cache, server, monkeypatch):
    monkeypatch.setenv(adapter_references.REPLICATE_ENDPOINT_ENV, server.url)
    from_tar, generation = generate(sd15, cache, "owner/style-model")
    direct, _ = generate(sd15, cache, f"{server.url}/style.safetensors")
    assert np.array_equal(from_tar, direct)
    assert generation.loras[0].name == "style-model"


def test_tokens_go_to_their_own_host_only(cache, server, monkeypatch, tmp_path):
    monkeypatch.setenv(adapter_references.REPLICATE_ENDPOINT_ENV, server.url)
    request = resolve_request(limits_for_sd15(), prompt="x", lora_weights="owner/style-model")
    server_tokens = {"REPLICATE_API_TOKEN": "r8_secret", "HF_TOKEN": "hf_secret"}
    cache.fetch_loras(request.loras, adapter_tokens(environ=server_tokens))
    headers = [headers for path, headers in server.requests if path == "/owner/style-model/_weights"][-1]
    assert headers.get("Authorization") == "Bearer r8_secret"
    # A request's own token comes first (a fresh cache, so that the file is fetched again).
    fresh = AdapterCache(tmp_path / "fresh", max_bytes=10**9, max_file_bytes=10**8)
    fresh.fetch_loras(request.loras, adapter_tokens(replicate="r8_request", environ=server_tokens))
    headers = [headers for path, headers in server.requests if path == "/owner/style-model/_weights"][-1]
    assert headers.get("Authorization") == "Bearer r8_request"
    request = resolve_request(limits_for_sd15(), prompt="x", lora_weights=f"{server.url}/other.safetensors")
    cache.fetch_loras(request.loras, adapter_tokens(huggingface="hf_request", environ=server_tokens))
    headers = [headers for path, headers in server.requests if path == "/other.safetensors"][-1]
    assert "Authorization" not in headers


def limits_for_sd15():
    return ModelLimits(SD1, 64, 64)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/model.ckpt", "is not a safetensors file; only safetensors weights are loaded"),
        ("/missing.safetensors", "answered HTTP 404"),
        ("/xl.safetensors", "is not a LoRA for this model"),
        ("/EasyNegative.safetensors", "EasyNegative is not a LoRA for this model"),
        ("/truncated.safetensors", "cannot read it as safetensors"),
    ],
)
def test_a_bad_lora_fails_the_request_naming_the_field(sd15, cache, server, path, message):
    with pytest.raises(InputError, match=message) as error:
        generate(sd15, cache, f"{server.url}{path}")
    assert error.value.field == "lora_weights"
    # Nothing left behind: a file stored for this request that failed to load is forgotten (issue 16).
    index = cache.root / "references.json"
    assert not list(cache.root.glob("*.safetensors"))
    assert not index.exists() or json.loads(index.read_text()) == {}
    base, _ = generate(sd15, cache)
    again, _ = generate(sd15, cache)
    assert np.array_equal(base, again)


def test_a_bomb_under_the_limit_is_stored_then_forgotten_when_it_is_no_lora(sd15, tmp_path):
    """Issue 16: a small .tar.xz unpacking to a safetensors file of zeros passed every check, was
    stored in the cache, failed to load as a LoRA, and stayed."""
    cache = AdapterCache(tmp_path / "adapters", max_bytes=10**9, max_file_bytes=10**6)
    with pytest.raises(InputError, match="inline is not a LoRA for this model") as error:
        generate(sd15, cache, data_uri(bomb("xz", unpacked_mb=0.5)))
    assert error.value.field == "lora_weights" and cache.downloads == 1
    assert sorted(path.name for path in cache.root.iterdir()) == [
        "references.json",
        "trained-embeddings.json",
    ]
    assert json.loads((cache.root / "references.json").read_text()) == {}
    assert json.loads((cache.root / "trained-embeddings.json").read_text()) == {}


def test_private_addresses_are_refused_unless_the_operator_allows_them(cache, monkeypatch):
    monkeypatch.delenv("SDCOG_ALLOW_LOCAL_URLS")
    request = resolve_request(limits_for_sd15(), prompt="x", lora_weights="https://127.0.0.1:9/a.safetensors")
    with pytest.raises(InputError, match="private, loopback or link-local"):
        cache.fetch_loras(request.loras)
    request = resolve_request(limits_for_sd15(), prompt="x", lora_weights="http://example.com/a.safetensors")
    with pytest.raises(InputError, match="https://"):
        cache.fetch_loras(request.loras)


def test_a_hugging_face_listing_that_breaks_off_fails_naming_the_field(cache, monkeypatch):
    """huggingface_hub's HTTP client raises its own errors, after 5 retries: a server that hangs up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def hang_up():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            connection.close()

    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)  # its backoff
    monkeypatch.setenv(adapter_references.HF_ENDPOINT_ENV, f"http://127.0.0.1:{listener.getsockname()[1]}")
    request = resolve_request(limits_for_sd15(), prompt="x", lora_weights="huggingface.co/owner/repo")
    with pytest.raises(InputError, match="cannot reach Hugging Face to list owner/repo") as error:
        cache.fetch_loras(request.loras)
    assert error.value.field == "lora_weights"
    listener.close()


def test_lora_on_sdxl_changes_the_image_and_leaves_nothing_behind(tiny_sdxl, cache, server):
    sdxl = Engine.load(tiny_sdxl)
    base, _ = generate(sdxl, cache)
    styled, _ = generate(sdxl, cache, f"{server.url}/xl.safetensors")
    long_prompt, _ = generate(sdxl, cache, f"{server.url}/xl.safetensors", prompt="(red:1.2) circle " * 40)
    after, _ = generate(sdxl, cache)
    assert np.abs(styled - base).mean() > 2 and np.array_equal(after, base)
    assert long_prompt.shape == base.shape


def test_loras_reach_the_attention_when_qkv_projections_are_fused(tiny_sd15, cache, server):
    """The GPU fast path fuses q, k and v into one matrix, which a LoRA on to_q/to_k/to_v misses."""
    plain = Engine.load(tiny_sd15)
    fused = Engine.load(tiny_sd15)
    optimize_modules(fused.pipeline)  # what the fast path does on a GPU, before Engine.load builds:
    fused.loras = LoraAdapters(fused.pipeline)
    url = f"{server.url}/style.safetensors"
    for _ in range(2):  # switching back and forth, more than once (found on an H100)
        assert np.abs(generate(fused, cache, url)[0] - generate(plain, cache, url)[0]).max() <= 2
        fused_base, _ = generate(fused, cache)
        assert np.abs(fused_base - generate(plain, cache)[0]).max() <= 2
    assert type(next(iter(fused.pipeline.unet.attn_processors.values()))).__name__ == "FusedAttnProcessor2_0"


def test_memory_stays_flat_over_many_lora_switches(tiny_sd15, cache, server):
    """60 requests cycling through 12 LoRAs (and none) with at most 4 loaded at a time."""
    engine = Engine.load(tiny_sd15)
    engine.loras = LoraAdapters(engine.pipeline, max_loaded=4)
    process = psutil.Process()
    references = [f"{server.url}/soak-{seed}.safetensors" for seed in range(10, 22)] + [None]
    parameters, rss = [], []
    for switch in range(60):
        generate(engine, cache, references[switch % len(references)])
        parameters.append(sum(p.numel() for p in engine.pipeline.unet.parameters()))
        rss.append(process.memory_info().rss)
        assert len(engine.loras.loaded) <= 4
    assert len(set(parameters[13:])) <= 5  # 0 to 4 adapters' parameters, never more
    growth = (max(rss[40:]) - max(rss[13:26])) / 2**20
    print(
        f"RSS over 60 LoRA switches: {rss[0] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB; growth {growth:.1f}"
    )
    assert growth < 20


def test_the_infotext_lists_each_lora_with_its_hash_and_scale(sd15, cache, server, lora_files):
    _, generation = generate(
        sd15, cache, f"{server.url}/style.safetensors, {server.url}/other.safetensors", "1, 0.5"
    )
    request = resolve_request(sd15.limits, prompt="a red circle", seed=1)
    fields = parse_infotext_fields(generation_infotext(request, 1, "tiny", loras=generation.loras))
    style_hash = tensor_data_hash_of(lora_files["/style.safetensors"])
    other_hash = tensor_data_hash_of(lora_files["/other.safetensors"])
    assert fields["Lora hashes"] == f"style: {style_hash}, other: {other_hash}"
    assert fields["Lora scales"] == "style: 1, other: 0.5"


def tensor_data_hash_of(data):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "lora.safetensors"
        path.write_bytes(data)
        return tensor_data_sha256(path)[:12]


def test_loras_do_not_change_the_shared_weights(sd15, cache, server):
    before = {
        name: tensor.clone() for name, tensor in sd15.pipeline.unet.state_dict().items() if "lora" not in name
    }
    generate(sd15, cache, f"{server.url}/style.safetensors")
    after = sd15.pipeline.unet.state_dict()
    assert all(torch.equal(tensor, after[name]) for name, tensor in before.items())


def test_through_the_http_server_loras_and_embeddings_are_fetched_once_and_named_in_the_metadata(
    tiny_sd15, server, lora_files, tmp_path
):
    env = {
        "MODEL_WEIGHTS": str(tiny_sd15),
        "SDCOG_ALLOW_LOCAL_URLS": "1",
        "SDCOG_ADAPTER_CACHE": str(tmp_path / "adapters"),
        adapter_references.REPLICATE_ENDPOINT_ENV: server.url,
    }
    write_schema(PROJECT_ROOT / ".cog" / "openapi_schema.json")
    inputs = {"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 2}
    url = f"{server.url}/style.safetensors?http-test"
    with running_server(PROJECT_ROOT, env=env) as http:
        before = server.count("/style.safetensors")
        outputs = []
        embedding = {
            "embeddings": f"{server.url}/EasyNegative.safetensors",
            "negative_prompt": "easynegative",
        }
        for lora, extra in ((url, {}), (url, embedding), (None, {})):
            loras = {"lora_weights": lora, "lora_scales": "0.7"} if lora else {}
            sent = {**inputs, "output_format": "png", **loras, **extra}
            body = http.predict(sent).json()
            assert body["status"] == "succeeded", body.get("error")
            data = base64.b64decode(body["output"][0].split(",", 1)[1])
            (tmp_path / "out.png").write_bytes(data)
            outputs.append(parse_infotext_fields(read_infotext(tmp_path / "out.png")))
        refused = http.predict({**inputs, "lora_weights": f"{server.url}/model.ckpt"}).json()
        not_an_embedding = http.predict({**inputs, "embeddings": f"w={server.url}/other.safetensors"}).json()
        secret = "r8_request_secret"
        with_token = http.predict(
            {**inputs, "lora_weights": "owner/style-model", "replicate_api_token": secret}
        ).json()
    assert server.count("/style.safetensors") == before + 1
    style_hash = tensor_data_hash_of(lora_files["/style.safetensors"])
    assert outputs[0]["Lora hashes"] == outputs[1]["Lora hashes"] == f"style: {style_hash}"
    assert outputs[0]["Lora scales"] == "style: 0.7" and "Lora hashes" not in outputs[2]
    assert refused["status"] == "failed" and "lora_weights" in refused["error"]
    assert "not a safetensors file" in refused["error"]
    embedding_hash = hashlib.sha256(lora_files["/EasyNegative.safetensors"]).hexdigest()[:12]
    assert outputs[1]["TI hashes"] == f"EasyNegative: {embedding_hash}"
    assert "TI hashes" not in outputs[0] and "TI hashes" not in outputs[2]
    assert not_an_embedding["status"] == "failed" and "embeddings" in not_an_embedding["error"]
    assert "is it a LoRA" in not_an_embedding["error"]
    # The server stored that file for the failed prediction, then forgot it (issue 16).
    other_hash = hashlib.sha256(lora_files["/other.safetensors"]).hexdigest()
    assert not (tmp_path / "adapters" / f"{other_hash}.safetensors").exists()
    assert other_hash not in (tmp_path / "adapters" / "references.json").read_text()
    assert with_token["status"] == "succeeded", with_token.get("error")
    headers = [headers for path, headers in server.requests if path == "/owner/style-model/_weights"][-1]
    assert headers.get("Authorization") == f"Bearer {secret}"
    assert secret not in json.dumps(with_token)  # not in the logs, nor in the echoed input


def test_a_bare_hugging_face_repository_is_listed_once_and_an_unreachable_hub_is_refused_at_once(
    monkeypatch,
):
    """`huggingface.co/owner/repo` without a file: the repository's one .safetensors (or the LoRA's usual name
    among several) is found by one real huggingface_hub call against a local hub."""
    import socket
    import time

    from hub_server import HubServer

    from sdcog.fetch.adapter_references import LORA, parse_reference, resolve_download

    with HubServer() as hub:
        hub.add_repo("owner/one", {"style.safetensors": b"x", "README.md": b"#"})
        hub.add_repo("owner/two", {"a.safetensors": b"x", "pytorch_lora_weights.safetensors": b"y"})
        hub.add_repo("owner/none", {"README.md": b"#"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)

        def resolved(text):
            return resolve_download(LORA, parse_reference("lora_weights", text))

        assert resolved("huggingface.co/owner/one").endswith("/owner/one/resolve/main/style.safetensors")
        assert resolved("huggingface.co/owner/two").endswith("/pytorch_lora_weights.safetensors")
        with pytest.raises(InputError, match="owner/none has no .safetensors file"):
            resolved("huggingface.co/owner/none")
        with pytest.raises(InputError, match=r"lora_weights: cannot list .*owner/missing \(HTTP 401\)"):
            resolved("huggingface.co/owner/missing")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    closed.close()
    started = time.perf_counter()
    with pytest.raises(InputError, match="lora_weights: cannot reach Hugging Face"):
        resolve_download(LORA, parse_reference("lora_weights", "huggingface.co/owner/one"))
    assert time.perf_counter() - started < 3  # was 23 s: huggingface_hub's listing retried 5 times
