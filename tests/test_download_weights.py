"""`script/download-weights` end to end (`sdcog_tools.download.main`) against a hub on 127.0.0.1
(tests/hub_server.py): the real huggingface_hub and httpx clients, the real files.

Diffusers pipeline repos; single-file checkpoints from a repo, from a file in a repo, from a hub URL
and from a plain URL with a token; interrupted downloads finished by a rerun; corrupted, truncated
and pickle files refused and not kept; a destination holding another model refused. What setup does
with the directory is tested elsewhere: here, the files written."""

import hashlib
import json
import pickle

import pytest
import torch
from hub_server import Corrupt, Cut, HubServer, Status
from safetensors.torch import save_file

from sdcog.model.weights import SOURCE_FILE
from sdcog_tools.download import main
from sdcog_tools.single_file_checkpoints import save_single_file

SD1_CONFIGS = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CHECKPOINT = "tiny-sd15.safetensors"
CONFIG_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "unet/config.json",
    "vae/config.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer/tokenizer.json",
}
CIVITAI_KEY = "civitai-api-key"
HF_KEY = "hf_private_token"


@pytest.fixture(scope="module")
def checkpoint(tiny_sd15, tmp_path_factory) -> bytes:
    """The tiny SD 1.5 pipeline as one original-layout safetensors file (5 MB)."""
    return save_single_file(tiny_sd15, tmp_path_factory.mktemp("checkpoint") / CHECKPOINT).read_bytes()


def _fp16_copies(directory, components):
    """`<stem>.fp16.safetensors` beside each weights file (the same bytes: only names are read)."""
    return {
        f"{component}/{path.stem}.fp16.safetensors": path.read_bytes()
        for component in components
        for path in (directory / component).glob("*.safetensors")
    }


@pytest.fixture(scope="module")
def server(tiny_sd15, checkpoint):
    weighted = ("unet", "vae", "text_encoder", "safety_checker")
    pickles = {"v1-5-pruned.ckpt": b"\x80\x04pickle", "unet/diffusion_pytorch_model.bin": b"\x80\x04pickle"}
    with HubServer() as hub:
        hub.add_repo_from_dir(SD1_CONFIGS, tiny_sd15)
        hub.add_repo_from_dir(
            "org/tiny-sd15",
            tiny_sd15,
            extra={
                **_fp16_copies(tiny_sd15, weighted),
                **pickles,
                "v1-5-pruned.safetensors": checkpoint,
                "unet/diffusion_pytorch_model.non_ema.safetensors": checkpoint[:1000],
            },
        )
        no_vae_fp16 = _fp16_copies(tiny_sd15, [c for c in weighted if c != "vae"])
        hub.add_repo_from_dir("org/partly-fp16", tiny_sd15, extra=no_vae_fp16)
        hub.add_repo("org/tiny-checkpoint", {CHECKPOINT: checkpoint, "README.md": b"# a checkpoint\n"})
        hub.add_repo(
            "org/collection",
            {f"models/{CHECKPOINT}": checkpoint, "a.safetensors": checkpoint, "b.safetensors": checkpoint},
        )
        hub.add_repo("org/private", {CHECKPOINT: checkpoint}, token=HF_KEY, cdn=True)
        yield hub


@pytest.fixture
def hub(server, monkeypatch, tmp_path):
    """The server as HF_ENDPOINT, for this test (no token, no faults left by another test).

    huggingface_hub reads HF_ENDPOINT when it is imported, so its constants are set too (the
    pipeline download relies on them; the checkpoint download reads HF_ENDPOINT each time)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "DOWNLOAD_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    server.clear_faults()
    yield server
    server.clear_faults()


def files_in(directory):
    """The files a download left, huggingface_hub's bookkeeping (.cache/) aside."""
    return {
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and not path.relative_to(directory).as_posix().startswith(".cache/")
    }


def source_of(directory):
    return json.loads((directory / SOURCE_FILE).read_text())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(*arguments, capsys):
    """main's exit status and what it printed (stdout + stderr)."""
    status = main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


# -- diffusers pipeline repos --


def test_a_pipeline_repo_gives_one_fp16_set_and_no_pickles(hub, tmp_path, capsys):
    dest = tmp_path / "weights"
    hub.fault("org/tiny-sd15/unet/diffusion_pytorch_model.fp16.safetensors", Status(503))
    status, output = run("org/tiny-sd15", "--dest", dest, capsys=capsys)
    assert status == 1 and "download-weights:" in output
    assert source_of(dest)["complete"] is False  # what setup reads as an interrupted download

    status, output = run("org/tiny-sd15", "--dest", dest, capsys=capsys)  # the rerun finishes it
    assert status == 0, output
    weights = sorted(name for name in files_in(dest) if name.endswith((".safetensors", ".bin", ".ckpt")))
    assert weights == [
        "safety_checker/model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert {"model_index.json", "unet/config.json", "tokenizer/vocab.json"} <= files_in(dest)
    revision = hub.repos["org/tiny-sd15"].sha
    assert source_of(dest) == {"model_id": "org/tiny-sd15", "revision": revision, "variant": "fp16"}
    assert "org/tiny-sd15 (fp16) is in" in output


def test_a_pipeline_repo_without_a_full_fp16_set_gives_full_precision(hub, tmp_path, capsys):
    dest = tmp_path / "weights"
    status, output = run("org/partly-fp16", "--dest", dest, capsys=capsys)
    assert status == 0, output
    assert sorted(name for name in files_in(dest) if name.endswith(".safetensors")) == [
        "safety_checker/model.safetensors",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert source_of(dest)["variant"] is None


def test_a_pipeline_component_with_only_pickles_is_refused(hub, tiny_sd15, tmp_path, capsys):
    vae = tiny_sd15 / "vae" / "diffusion_pytorch_model.safetensors"
    files = {
        path.relative_to(tiny_sd15).as_posix(): path.read_bytes()
        for path in tiny_sd15.rglob("*")
        if path.is_file() and path != vae
    }
    hub.add_repo("org/pickled-vae", {**files, "vae/diffusion_pytorch_model.bin": b"\x80\x04pickle"})
    status, output = run("org/pickled-vae", "--dest", tmp_path / "weights", capsys=capsys)
    assert status == 1
    assert "component vae has no .safetensors weights" in output


# -- single-file checkpoints from the hub --


def test_a_repo_with_one_checkpoint_gives_it_with_its_family_configs(hub, checkpoint, tmp_path, capsys):
    dest = tmp_path / "weights"
    status, output = run("org/tiny-checkpoint", "--dest", dest, capsys=capsys)
    assert status == 0, output
    assert files_in(dest) == {CHECKPOINT, SOURCE_FILE} | CONFIG_FILES  # no weights but the file's
    assert (dest / CHECKPOINT).read_bytes() == checkpoint
    commit = hub.repos["org/tiny-checkpoint"].sha
    assert source_of(dest) == {
        "checkpoint": CHECKPOINT,
        "source": "org/tiny-checkpoint",
        "url": f"{hub.url}/org/tiny-checkpoint/resolve/{commit}/{CHECKPOINT}",
        "sha256": sha256(checkpoint),
        "size": len(checkpoint),
        "config_repository": SD1_CONFIGS,
        "complete": True,
    }
    scheduler = json.loads((dest / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"
    assert "Stable Diffusion 1.x" in output and SD1_CONFIGS in output

    # A rerun checks the file it has (its sha256) instead of fetching it again.
    gets = len(hub.file_gets(f"org/tiny-checkpoint/{CHECKPOINT}"))
    status, output = run("org/tiny-checkpoint", "--dest", dest, capsys=capsys)
    assert status == 0, output
    assert "already in" in output and len(hub.file_gets(f"org/tiny-checkpoint/{CHECKPOINT}")) == gets


def test_a_file_in_a_repo_with_declarations(hub, checkpoint, tmp_path, capsys):
    dest = tmp_path / "weights"
    reference = f"org/collection/models/{CHECKPOINT}"
    arguments = ("--prediction-type", "v_prediction", "--few-step", "lcm", "--sha256", sha256(checkpoint))
    status, output = run(reference, "--dest", dest, *arguments, capsys=capsys)
    assert status == 0, output
    assert files_in(dest) == {CHECKPOINT, SOURCE_FILE} | CONFIG_FILES  # at the top level, not in models/
    source = source_of(dest)
    assert source["prediction_type"] == "v_prediction" and source["few_step"] == "lcm"
    assert source["source"] == reference and source["complete"] is True
    scheduler = json.loads((dest / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


def test_a_repo_with_several_checkpoints_is_refused_naming_them(hub, tmp_path, capsys):
    status, output = run("org/collection", "--dest", tmp_path / "weights", capsys=capsys)
    assert status == 1
    assert "a.safetensors, b.safetensors" in output
    assert "script/download-weights org/collection/a.safetensors" in output
    assert hub.file_gets("org/collection/a.safetensors") == []


def test_a_hub_url_of_a_private_repo_needs_hf_token(hub, checkpoint, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "weights"
    url = f"https://huggingface.co/org/private/blob/main/{CHECKPOINT}"
    status, output = run(url, "--dest", dest, capsys=capsys)
    assert status == 1 and "HF_TOKEN" in output
    assert not (dest / CHECKPOINT).exists()

    monkeypatch.setenv("HF_TOKEN", HF_KEY)
    status, output = run(url, "--dest", dest, capsys=capsys)
    assert status == 0, output
    assert (dest / CHECKPOINT).read_bytes() == checkpoint
    # Read at HF_ENDPOINT; the big file from the "CDN" host, where the token is not sent.
    (get,) = hub.file_gets(f"org/private/{CHECKPOINT}")
    assert get.path.startswith("/cdn-lfs/") and get.header("Authorization") is None
    heads = [r for r in hub.requests_to(CHECKPOINT, "HEAD") if r.path.startswith("/org/private/resolve/")]
    assert heads[-1].header("Authorization") == f"Bearer {HF_KEY}"


def test_an_interrupted_hub_download_is_finished_by_a_rerun(hub, checkpoint, tmp_path, capsys):
    dest = tmp_path / "weights"
    target = f"org/tiny-checkpoint/{CHECKPOINT}"
    # The connection drops mid-file, and the server is down when huggingface_hub tries to resume.
    hub.fault(target, Cut(len(checkpoint) // 2), Status(503))
    status, output = run("org/tiny-checkpoint", "--dest", dest, capsys=capsys)
    assert status == 1 and "interrupted" in output and "run the same command again" in output
    assert not (dest / CHECKPOINT).exists() and source_of(dest)["complete"] is False

    status, output = run("org/tiny-checkpoint", "--dest", dest, capsys=capsys)
    assert status == 0, output
    assert (dest / CHECKPOINT).read_bytes() == checkpoint
    assert source_of(dest)["complete"] is True and source_of(dest)["sha256"] == sha256(checkpoint)
    assert not list((dest / ".cache").rglob("*.incomplete"))


def test_a_corrupted_hub_download_is_deleted(hub, checkpoint, tmp_path, capsys):
    dest = tmp_path / "weights"
    hub.fault(f"org/tiny-checkpoint/{CHECKPOINT}", Corrupt())  # the right size, other bytes
    status, output = run("org/tiny-checkpoint", "--dest", dest, capsys=capsys)
    assert status == 1
    assert f"not the {sha256(checkpoint)} expected" in output and "deleted" in output
    assert not (dest / CHECKPOINT).exists() and source_of(dest)["complete"] is False
    assert "model_index.json" not in files_in(dest)


def test_a_pickle_is_refused_by_name_and_by_content(hub, tmp_path, capsys):
    zipped = tmp_path / "zipped.pt"
    torch.save({"weight": torch.zeros(4)}, zipped)
    hub.add_repo("org/pickles", {"model.ckpt": b"\x80\x04pickle", "model.safetensors": zipped.read_bytes()})
    dest = tmp_path / "weights"
    status, output = run("org/pickles/model.ckpt", "--dest", dest, capsys=capsys)
    assert status == 1 and "pickle" in output and hub.file_gets("org/pickles/model.ckpt") == []

    status, output = run("org/pickles/model.safetensors", "--dest", dest, capsys=capsys)  # torch.save bytes
    assert status == 1 and "pickle" in output and "nothing was kept" in output
    assert not (dest / "model.safetensors").exists()


# -- plain URLs --


def test_a_plain_url_with_a_token(hub, checkpoint, tmp_path, capsys):
    dest = tmp_path / "weights"
    url = hub.add_file("api/download/models/128713", checkpoint, token=CIVITAI_KEY, filename=CHECKPOINT)
    status, output = run(url, "--dest", dest, capsys=capsys)
    assert status == 1 and "needs a token (HTTP 401)" in output and "DOWNLOAD_TOKEN" in output
    assert files_in(dest) <= {SOURCE_FILE} and source_of(dest)["complete"] is False

    status, output = run(url, "--dest", dest, "--token", CIVITAI_KEY, capsys=capsys)
    assert status == 0, output
    assert hub.file_gets("api/download/models/128713")[-1].header("Authorization") == f"Bearer {CIVITAI_KEY}"
    assert files_in(dest) == {CHECKPOINT, SOURCE_FILE} | CONFIG_FILES  # named as Content-Disposition says
    assert source_of(dest) == {
        "checkpoint": CHECKPOINT,
        "source": url,
        "url": url,
        "sha256": sha256(checkpoint),
        "size": len(checkpoint),
        "config_repository": SD1_CONFIGS,
        "complete": True,
    }


def test_an_interrupted_plain_download_is_resumed_by_a_rerun(hub, checkpoint, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "weights"
    url = hub.add_file("resumable.safetensors", checkpoint, token=CIVITAI_KEY)
    monkeypatch.setenv("DOWNLOAD_TOKEN", CIVITAI_KEY)
    hub.fault("resumable.safetensors", Cut(3_000_000), Status(503))
    status, output = run(url, "--dest", dest, capsys=capsys)
    assert status == 1 and "interrupted" in output and "resume" in output
    partial = dest / ".resumable.safetensors.partial"
    kept = partial.stat().st_size
    assert 0 < kept <= 3_000_000 and source_of(dest)["complete"] is False

    status, output = run(url, "--dest", dest, capsys=capsys)
    assert status == 0, output
    assert hub.file_gets("resumable.safetensors")[-1].header("Range") == f"bytes={kept}-"
    assert (dest / "resumable.safetensors").read_bytes() == checkpoint and not partial.exists()
    assert source_of(dest)["sha256"] == sha256(checkpoint) and source_of(dest)["complete"] is True


def test_a_rerun_starts_again_when_the_server_ignores_the_range(hub, checkpoint, tmp_path, capsys):
    dest = tmp_path / "weights"
    url = hub.add_file("no-ranges.safetensors", checkpoint)
    hub.fault("no-ranges.safetensors", Cut(3_000_000), Status(503))
    assert run(url, "--dest", dest, capsys=capsys)[0] == 1
    assert (dest / ".no-ranges.safetensors.partial").stat().st_size > 0
    hub.served("no-ranges.safetensors").ranges = False
    status, output = run(url, "--dest", dest, capsys=capsys)
    assert status == 0, output
    assert hub.file_gets("no-ranges.safetensors")[-1].header("Range") is not None  # asked, answered 200
    assert (dest / "no-ranges.safetensors").read_bytes() == checkpoint


def test_a_connection_lost_mid_file_is_resumed_in_the_same_run(hub, checkpoint, tmp_path, capsys):
    dest = tmp_path / "weights"
    url = hub.add_file("flaky.safetensors", checkpoint)
    hub.fault("flaky.safetensors", Cut(2_000_000))
    status, output = run(url, "--dest", dest, capsys=capsys)
    assert status == 0, output
    first, second = hub.file_gets("flaky.safetensors")
    assert first.header("Range") is None and second.header("Range").startswith("bytes=")
    assert (dest / "flaky.safetensors").read_bytes() == checkpoint


def test_corrupted_truncated_and_pickled_plain_downloads_are_not_kept(hub, checkpoint, tmp_path, capsys):
    corrupted = hub.add_file("corrupted.safetensors", checkpoint)
    hub.fault("corrupted.safetensors", Corrupt())
    dest = tmp_path / "corrupted"
    status, output = run(corrupted, "--dest", dest, "--sha256", sha256(checkpoint), capsys=capsys)
    assert status == 1 and "failed verification" in output and "deleted" in output
    assert files_in(dest) == {SOURCE_FILE}

    truncated = hub.add_file("truncated.safetensors", checkpoint[:-1000])
    dest = tmp_path / "truncated"
    status, output = run(truncated, "--dest", dest, capsys=capsys)
    assert status == 1 and "truncated" in output and files_in(dest) == {SOURCE_FILE}

    pickled = hub.add_file("pickled.safetensors", pickle.dumps({"weights": list(range(1000))}, protocol=4))
    dest = tmp_path / "pickled"
    status, output = run(pickled, "--dest", dest, capsys=capsys)
    assert status == 1 and "pickle" in output and files_in(dest) == {SOURCE_FILE}

    status, output = run(f"{hub.url}/files/model.ckpt", "--dest", dest, capsys=capsys)
    assert status == 1 and "pickle" in output and hub.count("/files/model.ckpt") == 0

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(4, 4)}, lora)
    not_a_model = hub.add_file("lora.safetensors", lora.read_bytes())
    dest = tmp_path / "lora"
    status, output = run(not_a_model, "--dest", dest, capsys=capsys)
    assert status == 1 and "was deleted" in output and files_in(dest) == {SOURCE_FILE}


def test_an_sdxl_checkpoint_gets_both_text_encoders_configs(hub, tiny_sdxl, tmp_path, capsys):
    hub.add_repo_from_dir("stabilityai/stable-diffusion-xl-base-1.0", tiny_sdxl)
    sdxl = save_single_file(tiny_sdxl, tmp_path / "tiny-sdxl.safetensors").read_bytes()
    dest = tmp_path / "weights"
    status, output = run(hub.add_file("tiny-sdxl.safetensors", sdxl), "--dest", dest, capsys=capsys)
    assert status == 0, output
    assert "Stable Diffusion XL" in output
    assert {"text_encoder_2/config.json", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"} <= files_in(
        dest
    )
    assert not [name for name in files_in(dest) if name.endswith(".safetensors") and "/" in name]
    assert source_of(dest)["config_repository"] == "stabilityai/stable-diffusion-xl-base-1.0"


# -- the destination --


def test_a_destination_holding_another_model_is_refused(hub, tmp_path, capsys):
    dest = tmp_path / "weights"
    status, output = run("org/tiny-checkpoint", "--dest", dest, capsys=capsys)
    assert status == 0, output
    for other in ("org/tiny-sd15", f"org/collection/models/{CHECKPOINT}"):
        status, output = run(other, "--dest", dest, capsys=capsys)
        assert status == 1
        assert f"holds the checkpoint {CHECKPOINT}" in output and "--dest" in output

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "README.md").write_text("kept\n")
    (unknown / "model_index.json").write_text("{}")
    status, output = run("org/tiny-checkpoint", "--dest", unknown, capsys=capsys)
    assert status == 1 and "model_index.json" in output and f"Empty {unknown}" in output


def test_a_local_checkpoint_gets_its_configs_beside_it(hub, checkpoint, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "mine.safetensors").write_bytes(checkpoint)
    status, output = run(folder / "mine.safetensors", capsys=capsys)
    assert status == 0, output
    assert files_in(folder) == {"mine.safetensors", SOURCE_FILE} | CONFIG_FILES
    source = source_of(folder)
    assert source["checkpoint"] == "mine.safetensors" and source["url"] is None
    assert source["complete"] is True and source["config_repository"] == SD1_CONFIGS


def test_a_local_checkpoint_is_copied_into_dest(hub, checkpoint, tmp_path, capsys):
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "mine.safetensors").write_bytes(checkpoint)
    dest = tmp_path / "weights"
    for _ in range(2):  # a rerun finds it there
        status, output = run(tmp_path / "downloads" / "mine.safetensors", "--dest", dest, capsys=capsys)
        assert status == 0, output
    assert "already in" in output
    assert files_in(dest) == {"mine.safetensors", SOURCE_FILE} | CONFIG_FILES
    assert files_in(tmp_path / "downloads") == {"mine.safetensors"}
