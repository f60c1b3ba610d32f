"""The `input_images` archive of `cog train` (issue 19, first step): zip or tar by content, captions
from caption.csv, .txt files or the trigger word, images upright and square, and every refusal
naming the field and the entry."""

from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from sdcog.errors import InputError
from sdcog.train import dataset
from sdcog.train.dataset import read_training_set


def png(width=96, height=64, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def write_zip(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def write_tar(path, files: dict[str, bytes], mode="w:gz"):
    with tarfile.open(path, mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("writer", [write_zip, write_tar])
def test_a_zip_or_a_tar_without_a_suffix_is_read_by_its_content(tmp_path, writer):
    """Presigned URLs often have no .zip at the end: Replicate's trainers refused those."""
    archive = writer(tmp_path / "upload", {"photos/a.png": png(), "photos/b.jpg": _jpeg()})
    items = read_training_set(archive, resolution=64)
    assert [item.name for item in items] == ["photos/a.png", "photos/b.jpg"]
    assert all(item.image.size == (64, 64) and item.image.mode == "RGB" for item in items)
    assert [item.caption for item in items] == ["a photo of TOK"] * 2


def _jpeg(width=80, height=120, orientation=None) -> bytes:
    image = Image.new("RGB", (width, height), (20, 40, 220))
    image.paste((250, 250, 250), (0, 0, width, height // 4))  # the top quarter white
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def test_captions_come_from_caption_csv_then_txt_files_then_the_trigger_word(tmp_path):
    files = {
        "set/one.png": png(),
        "set/two.png": png(),
        "set/two.txt": b"a TOK dog on grass\n",
        "set/three.png": png(),
        "set/caption.csv": b"caption,image_file\na TOK dog asleep,one.png\n",
    }
    items = read_training_set(
        write_zip(tmp_path / "a.zip", files), 64, trigger_word="zwx", caption_prefix="art by "
    )
    captions = {item.name: (item.caption, item.caption_from) for item in items}
    assert captions == {
        "set/one.png": ("a TOK dog asleep", "set/caption.csv"),
        "set/three.png": ("art by zwx", "caption_prefix and trigger_word"),
        "set/two.png": ("a TOK dog on grass", "set/two.txt"),
    }


def test_images_are_turned_upright_cropped_to_their_centre_and_resized(tmp_path):
    # Stored 120 wide and 80 high, EXIF orientation 6: shown 80 wide and 120 high, white on top.
    rotated = Image.open(io.BytesIO(_jpeg(80, 120))).transpose(Image.Transpose.ROTATE_90)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(buffer, "JPEG", exif=exif.tobytes())
    [item] = read_training_set(write_zip(tmp_path / "a.zip", {"x.jpg": buffer.getvalue()}), 80)
    pixels = np.asarray(item.image, dtype=np.int16)
    assert item.image.size == (80, 80)
    # The centre square of the upright 80x120 image: rows 20-100, so the white top quarter (0-30)
    # shows as its first 10 rows.
    assert pixels[:8].mean() > 200 and pixels[-20:, :, 2].mean() > 180 and pixels[-20:, :, 0].mean() < 60


@pytest.mark.parametrize(
    "files, message",
    [
        ({"notes.txt": b"hello"}, "the archive holds no images"),
        ({"a.png": b"not a png"}, "a.png: is not a readable image file"),
        ({"a.png": png(32, 100)}, "a.png: is 32x100 pixels; each side must be at least 64"),
        ({"../evil.png": png()}, "'../evil.png': a path that leaves the archive"),
        ({"/etc/evil.png": png()}, "'/etc/evil.png': an absolute path"),
        (
            {"a.png": png(), "caption.csv": b"caption,image_file\nx,missing.png\n"},
            "caption.csv line 2: 'missing.png' names no image",
        ),
        (
            {"a.png": png(), "caption.csv": b"text,file\nx,a.png\n"},
            "caption.csv: needs the columns caption and image_file",
        ),
    ],
)
def test_a_bad_archive_is_refused_naming_the_field_and_the_entry(tmp_path, files, message):
    with pytest.raises(InputError, match="^input_images: ") as refused:
        read_training_set(write_zip(tmp_path / "a.zip", files), 64)
    assert message in str(refused.value)


def test_something_that_is_no_archive_is_refused(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(png())
    with pytest.raises(InputError, match="input_images: is neither a zip nor a tar archive"):
        read_training_set(path, 64)


def test_the_limits_bound_entries_and_bytes_as_they_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "MAX_ENTRIES", 3)
    many = {f"{index}.png": png() for index in range(4)}
    with pytest.raises(InputError, match="more than 3 entries"):
        read_training_set(write_tar(tmp_path / "many.tar.gz", many), 64)
    monkeypatch.setattr(dataset, "MAX_ENTRIES", 100)
    monkeypatch.setattr(dataset, "MAX_TOTAL_BYTES", 10_000)
    # 1 MB of zeros compresses to 1 kB: a skipped member counts too.
    bomb = {"a.png": png(), "padding.bin": bytes(1_000_000)}
    with pytest.raises(InputError, match="unpacks to more than 10,000 bytes"):
        read_training_set(write_tar(tmp_path / "bomb.tar.xz", bomb, "w:xz"), 64)
    monkeypatch.setattr(dataset, "MAX_ENTRY_BYTES", 100)
    with pytest.raises(InputError, match="a.png: .* the limit is 100 per file"):
        read_training_set(write_zip(tmp_path / "big.zip", {"a.png": png()}), 64)


def test_what_archivers_add_is_skipped(tmp_path):
    files = {"a.png": png(), "__MACOSX/._a.png": b"junk", "._b.png": b"junk", ".DS_Store": b"junk"}
    assert [item.name for item in read_training_set(write_zip(tmp_path / "a.zip", files), 64)] == ["a.png"]
