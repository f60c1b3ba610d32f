"""Each use of a dependency's internals is marked, pinned to the version it was checked against,
and probed here, so that an upgrade fails these tests by name instead of breaking silently."""

import importlib
import inspect
import subprocess
import sys
import tarfile

import pytest
from huggingface_hub._local_folder import get_local_download_paths, write_download_metadata
from runtime_env import canonical, cog_config, pins, requirements_file, sdk_version
from transformers.models.clip import modeling_clip

from sdcog.model.weights import hub_download_leftovers
from sdcog.pinned_internals import PINNED, PinnedInternal, unchecked_internals

MARKED = {
    "sdcog.fetch.input_files.guard_cog_downloads": "cog",
    "sdcog.fetch.adapter_archives.CheckedTarInfo": "python",
    "sdcog.generate.embeddings._pool_at_the_end_token": "transformers",
    "sdcog.generate.controlnets._diffusers_keys": "diffusers",
    "sdcog.model.weights.hub_download_leftovers": "huggingface_hub",
    "sdcog.model.weights_check._culprit": "diffusers",
    "sdcog_tools.cog_schema.load_predictor_info": "cog",
    "sdcog_tools.cog_schema.build_schema": "cog",
}


@pytest.fixture(scope="module")
def pinned():
    for user in MARKED:
        importlib.import_module(user.rpartition(".")[0])
    return {pin.user: pin for pin in PINNED}


def test_every_use_of_a_dependencys_internals_is_marked_once(pinned):
    assert {user: pin.distribution for user, pin in pinned.items()} == MARKED
    assert len(PINNED) == len(pinned)


def image_pins() -> dict[str, str]:
    """The versions the image gets: requirements.txt's pins, cog.yaml's Cog SDK and Python."""
    python = cog_config()["build"]["python_version"]
    return {**pins(requirements_file()), "cog": sdk_version(), "python": python}


@pytest.mark.parametrize("user", sorted(MARKED))
def test_the_pinned_version_is_the_one_installed_and_the_one_the_image_gets(pinned, user):
    pin = pinned[user]
    assert pin.installed() == pin.version, (
        f"{pin.distribution} {pin.installed()} is installed, but {user} was checked against "
        f"{pin.version} only ({pin.relies_on}): re-check it against the new version, then update its pin"
    )
    assert image_pins()[canonical(pin.distribution)] == pin.version, (
        f"the image installs {pin.distribution} {image_pins()[canonical(pin.distribution)]}, but {user} "
        f"was checked against {pin.version} only ({pin.relies_on}): re-check it, then update its pin"
    )


def test_a_version_other_than_the_pinned_one_is_reported_naming_the_user(monkeypatch):
    assert unchecked_internals() == []
    moved = PinnedInternal("huggingface_hub", "0.0.1", "some.module.function", "its cache layout")
    monkeypatch.setattr("sdcog.pinned_internals.PINNED", [*PINNED, moved])
    [line] = unchecked_internals()
    assert line.startswith("some.module.function relies on its cache layout of huggingface_hub 0.0.1, but")
    assert line.endswith("is installed: re-check it")


# -- each internal, probed -------------------------------------------------------------------


def test_cog_hands_file_inputs_over_untouched_once_guarded():
    """Cog's URLPath.convert and Path.validate are what guard_cog_downloads replaces."""
    probe = (
        "from cog.types import Path, URLPath\n"
        "from sdcog.fetch.input_files import guard_cog_downloads\n"
        "assert guard_cog_downloads()\n"
        "value = Path.validate('https://example.com/a.png')\n"
        "assert isinstance(value, URLPath) and value.source == 'https://example.com/a.png'\n"
        "assert value.convert() is value\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def test_huggingface_hubs_download_bookkeeping_is_what_hub_download_leftovers_reads(tmp_path):
    """The paths huggingface_hub writes, made by huggingface_hub itself."""
    assert hub_download_leftovers(tmp_path) is None
    paths = get_local_download_paths(tmp_path, "unet/diffusion_pytorch_model.safetensors")
    partial = paths.incomplete_path("etag1")
    partial.write_bytes(b"half")
    assert hub_download_leftovers(tmp_path) == [partial]
    write_download_metadata(tmp_path, "unet/diffusion_pytorch_model.safetensors", "commit", "etag1")
    assert hub_download_leftovers(tmp_path) == []  # the same etag finished later: stale


def test_tarfile_still_has_the_member_hooks_checked_tar_info_overrides():
    for name in ("_proc_member", "_proc_gnusparse_00", "_proc_gnusparse_01", "_proc_gnusparse_10"):
        assert callable(getattr(tarfile.TarInfo, name, None)), f"tarfile.TarInfo.{name} is gone"


def test_clip_still_chooses_its_pooling_by_the_eos_token_id_attribute():
    source = inspect.getsource(modeling_clip)
    assert "self.eos_token_id == 2" in source


def test_diffusers_still_converts_original_controlnet_keys_as_diffusers_keys_reads_them():
    from diffusers.loaders import single_file_utils

    parameters = inspect.signature(single_file_utils.convert_controlnet_checkpoint).parameters
    assert list(parameters)[:2] == ["checkpoint", "config"]
    layers = single_file_utils.DIFFUSERS_TO_LDM_MAPPING["controlnet"]["layers"]
    assert layers["time_embedding.linear_1.weight"] == "time_embed.0.weight"
    assert single_file_utils.LDM_CONTROLNET_KEY == "control_model."
