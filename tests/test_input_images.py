"""Input image files as users send them: formats read or refused, bombs, bit depths, frames.

The files come from tests/hostile_images.py, whose docstrings say what each must answer.
"""

import io
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hostile_images import (
    _ORIENTATION_ROTATE_90,
    CLAIMING,
    FLOODS,
    REFUSED_FORMATS,
    _exif_png,
    animated,
    camera_jpeg,
    float_tiff,
    grey12_tiff,
    grey16_mask_png,
    grey16_png,
    grey16_png_with_transparency,
    int16_signed_tiff,
    int32_tiff,
    lab_tiff,
    long_apng,
    long_gif,
    many_page_tiff,
    mpo_file,
    png,
    png_exif_fractions,
    png_in_small_chunks,
    progressive_jpeg,
    rgb16_png,
    tiff,
    tiff_in_row_strips,
    tiff_strip_flood,
)
from PIL import Image, ImageOps, TiffImagePlugin

from sdcog.errors import InputError
from sdcog.fetch.image_structure import check_structure
from sdcog.fetch.images import ACCEPTED_FORMATS, as_rgb, binary_mask, open_image, to_8_bit
from sdcog.model.families import SD1
from sdcog.resolve.request import ModelLimits, resolve_request

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ACCEPTED_TEXT = "send PNG, JPEG, WEBP, GIF, BMP or TIFF"
EIGHT_BIT_MODES = ("L", "LA", "RGB", "RGBA")


def refusal(field, data):
    with pytest.raises(InputError) as refused:
        open_image(field, data)
    assert refused.value.field == field
    return str(refused.value)


def grey_of(data, field="image"):
    """The RGB of the top-left pixel as the request uses the file (transparency on white)."""
    image = open_image(field, data)
    assert image.mode in EIGHT_BIT_MODES and type(image) is Image.Image
    return as_rgb(image).getpixel((0, 0))


# -- decompression bombs: refused from the header, in a fresh process to measure its memory --------

MEASURE = r"""
import json, re, signal, sys, time
import hostile_images
from sdcog.errors import InputError
from sdcog.fetch.images import open_image

class TookTooLong(BaseException):  # not an Exception: nothing on the way catches it
    pass

def took_too_long(signal_number, frame):
    raise TookTooLong

def refused(data):
    signal.alarm(SECONDS_ALLOWED)
    try:
        open_image("image", data)
    except InputError as error:
        return str(error)
    except TookTooLong:
        return f"still reading it after {SECONDS_ALLOWED} s"
    finally:
        signal.alarm(0)
    return None

def peak_mib():  # VmHWM: ru_maxrss would start at the parent's RSS, kept across exec
    return int(re.search(r"VmHWM:\s*(\d+) kB", open("/proc/self/status").read())[1]) / 1024

def reset_peak():  # so that building a file does not hide what reading it takes
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass

SECONDS_ALLOWED = 5
signal.signal(signal.SIGALRM, took_too_long)
refused(hostile_images.ico_file())  # warm up: Pillow imports its plugins on first use
results = []
for expression in json.loads(sys.argv[1]):
    data = eval(expression, vars(hostile_images))
    reset_peak()
    peak = peak_mib()
    start = time.perf_counter()
    message = refused(data)
    seconds = time.perf_counter() - start
    grown_mib = peak_mib() - peak
    results.append({"message": message, "seconds": seconds, "grown_mib": grown_mib, "bytes": len(data)})
    del data
print(json.dumps(results))
"""


def measured_refusals(expressions):
    """Each hostile_images expression's file through open_image in a fresh process: the refusal
    (or None), its time (given up after 5 s), and how much the process's peak RSS grew meanwhile."""
    env = {**os.environ, "PYTHONPATH": f"{PROJECT_ROOT}:{PROJECT_ROOT / 'tests'}"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(expressions)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return dict(zip(expressions, json.loads(done.stdout), strict=True))


def test_an_ico_wrapping_a_huge_png_is_refused_without_decoding_it():
    [result] = measured_refusals(["ico_bomb()"]).values()
    # Before: Pillow decoded the ICO's 177-megapixel PNG inside Image.open(), then the size check
    # refused it: 0.6 s and +173 MiB here (an RGB one: 2.3 s, +1,216 MiB in the worker).
    assert result["bytes"] < 100_000
    assert result["seconds"] < 0.5, result
    assert result["grown_mib"] < 30, result
    assert result["message"] == f"image: is in a format not read here (ICO?): {ACCEPTED_TEXT}"


@pytest.mark.parametrize("name", sorted(CLAIMING))
def test_every_format_read_is_refused_from_its_header_when_it_claims_too_many_pixels(name):
    expressions = [f"CLAIMING[{name!r}](10_000, 10_000)", f"CLAIMING[{name!r}](16_000, 16_000)"]
    results = measured_refusals(expressions)
    over_our_limit, over_pillows = results.values()
    assert over_our_limit["message"] == (
        "image: is 10000x10000 pixels; the limit is 50 megapixels (scale it down first)"
    )
    # Past twice Image.MAX_IMAGE_PIXELS Pillow's own check refuses it inside Image.open().
    assert over_pillows["message"] == (
        "image: is over 178 megapixels; the limit is 50 megapixels (scale it down first)"
    )
    for result in results.values():
        assert result["seconds"] < 0.5 and result["grown_mib"] < 30, result


def test_a_large_image_within_the_limit_is_read():
    data = png(7000, 7000, (32768,), bit_depth=16)  # 49 megapixels in 0.1 MB
    image = open_image("image", data)
    assert image.size == (7000, 7000) and image.mode == "L" and image.getpixel((6999, 6999)) == 128


# -- files stuffed with structure: refused from a bounded scan, before Pillow reads them ----------

FLOOD_REFUSALS = {
    "PNG chunks": "has over 4,096 PNG chunks besides image data",
    "PNG empty IDAT chunks": "has over 65,536 PNG image data chunks",
    "PNG Exif tags": "has 65,535 tags in one Exif IFD; the limit is 1,024",
    "JPEG segments": "has over 4,096 JPEG segments",
    "JPEG fill bytes": "has over 65,536 stray bytes between JPEG segments",
    "JPEG quantization tables": "has over 1,000,000 bytes of JPEG headers and metadata",
    "JPEG scans": "has over 24 JPEG scans",
    "GIF comments": "has over 16,384 GIF blocks before its first image",
    "GIF sub-blocks": "has over 16,384 GIF blocks before its first image",
    "GIF stray bytes": "has over 16,384 GIF blocks before its first image",
    "TIFF strips": "has 3,987,475 TIFF strips or tiles; the limit is 65,536",
    "TIFF tiles": "has 195,312 TIFF strips or tiles; the limit is 65,536",
    "TIFF tags": "has 1,594,980 tags in one TIFF IFD; the limit is 1,024",
    "TIFF colour map": "has over 196,608 numbers in its TIFF tags",
    "WEBP chunks": "has over 65,536 WebP chunks",
    "WEBP frames": "has over 65,536 WebP chunks",
}
"""Why each of hostile_images.FLOODS is refused: "image: <this> (re-save it)"."""


@pytest.fixture(scope="module")
def flood_results():
    return measured_refusals([f"FLOODS[{name!r}]()" for name in FLOODS])


@pytest.mark.parametrize("name", sorted(FLOODS))
def test_a_file_stuffed_with_structure_is_refused_quickly_naming_the_field(name, flood_results):
    result = flood_results[f"FLOODS[{name!r}]()"]
    # Before, Pillow read every chunk, segment, block, strip or tag (libjpeg every scan), one at a
    # time: up to 30 s (the scans: hours) or +1.3 GiB here (see each builder's docstring), and it
    # accepted most of them.
    assert result["message"] == f"image: {FLOOD_REFUSALS[name]} (re-save it)", result
    assert result["seconds"] < 1, result
    assert result["grown_mib"] < 50, result


def test_every_flood_is_named_here():
    assert set(FLOOD_REFUSALS) == set(FLOODS)


def test_an_exif_block_of_too_many_fractions_is_refused():
    assert open_image("image", png_exif_fractions(1024)).size == (32, 64)  # turned upright
    assert refusal("image", png_exif_fractions(1025)) == (
        "image: has over 1,024 fractions in its Exif tags (re-save it)"
    )


def test_malformed_gps_and_interop_tags_beside_an_orientation_are_no_crash():
    """Pillow's ImageOps.exif_transpose rewrites the Exif after turning the image, and raised
    AttributeError ('IFDRational' object has no attribute 'encode') on these 175 bytes: a crash
    naming no field. The image is now turned without rewriting anything."""
    data = _exif_png(
        [[_ORIENTATION_ROTATE_90, (0x8825, 4, 1, -1)], [(0x0001, 5, 1, -2)]], struct.pack("<II", 1, 2)
    )
    with Image.open(io.BytesIO(data)) as stored:
        size = stored.size
    assert open_image("image", data).size == size[::-1]


def test_a_tiff_listing_more_strips_than_its_rows_need_is_refused():
    data = tiff_strip_flood(8 * 1000 + 200, rows=1)  # 1,000 one-row strips for 1 row
    assert refusal("mask", data) == "mask: has 1,000 TIFF strips where its 1x1 pixels need 1 (re-save it)"


def _frames(data):
    return Image.open(io.BytesIO(data)).n_frames


def _strips(data):
    return len(Image.open(io.BytesIO(data)).tag_v2[273])


@pytest.mark.parametrize(
    ("build", "pieces", "at_least"),
    [
        pytest.param(png_in_small_chunks, lambda data: data.count(b"IDAT"), 15_000, id="PNG-IDAT-chunks"),
        pytest.param(long_apng, _frames, 4200, id="APNG-frames"),
        pytest.param(
            lambda: progressive_jpeg("L"), lambda data: data.count(b"\xff\xda"), 6, id="JPEG-grey-scans"
        ),
        pytest.param(progressive_jpeg, lambda data: data.count(b"\xff\xda"), 10, id="JPEG-scans"),
        pytest.param(
            lambda: progressive_jpeg("CMYK"), lambda data: data.count(b"\xff\xda"), 18, id="JPEG-CMYK-scans"
        ),
        pytest.param(camera_jpeg, lambda data: data.count(b"ICC_PROFILE"), 4, id="JPEG-Exif-ICC-segments"),
        pytest.param(long_gif, _frames, 300, id="GIF-frames"),
        pytest.param(many_page_tiff, _frames, 50, id="TIFF-pages"),
        pytest.param(tiff_in_row_strips, _strips, 2000, id="TIFF-strips"),
        pytest.param(lambda: tiff_in_row_strips(compression="tiff_lzw"), _strips, 2000, id="TIFF-LZW-strips"),
    ],
)
def test_real_files_with_much_structure_are_read_and_cheap_to_scan(build, pieces, at_least):
    data = build()
    assert pieces(data) >= at_least
    start = time.perf_counter()
    check_structure("image", data)
    assert time.perf_counter() - start < 0.2  # ~50 ms for the 16,000 IDAT chunks here
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB"))  # first frame
    image = open_image("image", data)
    assert np.array_equal(np.asarray(as_rgb(image)), np.asarray(expected))


# -- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED_FORMATS))
def test_formats_not_read_are_refused_naming_the_field_and_the_formats_read(name):
    message = refusal("mask", REFUSED_FORMATS[name]())
    assert message.startswith("mask: is in a format not read here (") and message.endswith(ACCEPTED_TEXT)
    if name != "TGA":  # TGA has no signature: its header reads as a CUR (cursor) file's
        assert f"({name}?)" in message


def test_a_file_that_is_no_image_lists_the_formats_read():
    assert (
        refusal("image", b"<html>not found</html>")
        == f"image: is not a readable image file ({ACCEPTED_TEXT})"
    )
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(noise, "PNG")
    message = refusal("image", noise.getvalue()[:2000])  # cut inside its pixel data
    assert message.startswith("image: is not a readable image file (OSError: image file is truncated")


@pytest.mark.parametrize(
    "data", [animated("GIF"), animated("PNG"), animated("WEBP"), animated("TIFF"), mpo_file()]
)
def test_a_file_with_several_frames_gives_its_first(data):
    image = open_image("image", data)
    assert type(image) is Image.Image and image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int) - (220, 20, 20)).max() <= 6  # red, not the blue frame 2


def test_every_format_read_is_checked_here():
    assert set(CLAIMING) == set(ACCEPTED_FORMATS)


# -- bit depths: read by their range, not clipped --------------------------------------------------

LIMITS = ModelLimits(SD1, 512, 512)


def test_a_16_bit_grey_png_reads_as_its_grey_through_the_request():
    assert [grey_of(grey16_png(value))[0] for value in (0, 257, 32768, 65535)] == [0, 1, 128, 255]
    request = resolve_request(LIMITS, prompt="x", image=open_image("image", grey16_png(32768, (64, 64))))
    assert np.unique(np.asarray(request.init_image)).tolist() == [128]  # was 255: a white input


def test_a_float_tiff_reads_0_to_1_as_black_to_white():
    values = (0.0, 0.25, 0.5, 1.0, 2.0, -1.0, math.nan, math.inf)
    assert [grey_of(float_tiff(value))[0] for value in values] == [0, 64, 128, 255, 255, 0, 0, 255]
    request = resolve_request(LIMITS, prompt="x", image=open_image("image", float_tiff(0.5, (64, 64))))
    assert np.unique(np.asarray(request.init_image)).tolist() == [128]  # was 0: a black input


def test_a_16_bit_mask_is_binarised_at_half_its_range():
    image = open_image("image", rgb16_png((32768, 32768, 32768), (64, 64)))
    mask = open_image("mask", grey16_mask_png(1000, 60000, (64, 64)))
    request = resolve_request(LIMITS, prompt="x", image=image, mask=mask)
    binary = np.asarray(request.mask_image)
    assert (binary[:, :32] == 0).all() and (binary[:, 32:] == 255).all()  # 1000 was white before
    assert binary_mask(open_image("mask", grey16_png(32768)), (16, 16)).getpixel((0, 0)) == 255
    with pytest.raises(InputError, match="all black"):
        binary_mask(open_image("mask", grey16_png(1000)), (16, 16))


@pytest.mark.parametrize(
    ("data", "grey"),
    [
        (grey12_tiff(2048), 128),
        (grey12_tiff(4095), 255),
        (int16_signed_tiff(16384), 128),
        (int16_signed_tiff(-5), 0),
        (int32_tiff(2**31), 128),
        (int32_tiff(2**32 - 1), 255),
        (int32_tiff(2**30, signed=True), 128),
        (int32_tiff(-(2**30), signed=True), 0),
        (lab_tiff(128), 119),  # L* 50.2: the sRGB grey of that lightness
        (rgb16_png((32768, 32768, 32768)), 128),
        (grey16_png_with_transparency(32768, 32768), 255),  # transparent: flattened onto white
        (grey16_png_with_transparency(16448, 32768), 64),
    ],
    ids=lambda value: "" if isinstance(value, bytes) else str(value),
)
def test_wide_and_unusual_samples_read_by_their_range(data, grey):
    assert np.abs(np.array(grey_of(data)) - grey).max() <= 1


UNREADABLE_TIFF_RAWMODES = {"L;IR", "P;1R", "P;2R", "P;4R"}
"""Layouts in Pillow's TIFF table that its decoder cannot unpack ("unknown raw mode"): refused."""
COLOUR_SAMPLES = {0: 1, 1: 1, 2: 3, 3: 1, 5: 4, 8: 3}  # per PhotometricInterpretation; YCbCr: 1 or 3


def _tiff_layout_cases():
    """One case per layout Pillow reads TIFFs in, with mid-grey samples: (file, grey, mode)."""
    cases = []
    for key, (mode, rawmode) in TiffImagePlugin.OPEN_INFO.items():
        prefix, photometric, (sample_format,), fill_order, bits, extra = key
        depth = bits[0]
        if sample_format == 3:
            top, mid = 1.0, 0.5
        elif sample_format == 2:
            top, mid = 2 ** (depth - 1) - 1, 2 ** (depth - 2)
        else:
            top, mid = 2**depth - 1, 2 ** (depth - 1)
        level = mid / top
        colour_count = COLOUR_SAMPLES.get(photometric, len(bits))
        colour_map = ()
        if photometric == 5:  # CMYK: black ink only
            samples, level = [0, 0, 0, mid], 1 - level
        elif photometric == 6 and colour_count == 3:  # YCbCr, neutral chroma
            samples = [mid, 2 ** (depth - 1), 2 ** (depth - 1)]
        elif photometric == 8:  # CIELab, neutral: L* 50.2 is sRGB 119
            samples, level = [mid, 0, 0], 119 / 255
        else:
            samples = [mid] * colour_count
            if photometric == 0:
                level = 1 - level
            if photometric == 3:  # a grey ramp
                colour_map = [index * 65535 // top for index in range(top + 1)] * 3
        samples += [top] * (len(bits) - colour_count)  # alpha (or unused): opaque
        data = tiff(
            4,
            3,
            samples,
            bits=bits,
            photometric=photometric,
            sample_format=sample_format,
            fill_order=fill_order,
            extra_samples=extra,
            colour_map=colour_map,
            big_endian=prefix == TiffImagePlugin.MM,
        )
        name = f"{prefix[:1].decode()}-photometric{photometric}-format{sample_format}-fill{fill_order}"
        name += f"-bits{'.'.join(map(str, bits))}-extra{'.'.join(map(str, extra))}-{mode}-{rawmode}"
        expected = None if rawmode in UNREADABLE_TIFF_RAWMODES else round(level * 255)
        cases.append(pytest.param(data, expected, mode, id=name))
    return cases


@pytest.mark.parametrize(("data", "grey", "pillow_mode"), _tiff_layout_cases())
def test_every_tiff_layout_pillow_reads_gives_its_grey(data, grey, pillow_mode):
    if grey is None:
        assert refusal("image", data).startswith("image: is not a readable image file (ValueError")
        return
    image = open_image("image", data)
    has_alpha = pillow_mode in ("LA", "La", "PA", "RGBA")
    assert image.mode in (("LA", "RGBA") if has_alpha else ("L", "RGB"))
    if has_alpha:
        assert image.getchannel("A").getextrema() == (255, 255)
    assert np.abs(np.array(as_rgb(image).getpixel((0, 0))) - grey).max() <= 2


def _png_layout_cases():
    cases = []
    for colour_type, depths in {
        0: (1, 2, 4, 8, 16),
        2: (8, 16),
        3: (1, 2, 4, 8),
        4: (8, 16),
        6: (8, 16),
    }.items():
        for depth in depths:
            top, mid = 2**depth - 1, 2 ** (depth - 1)
            chunks = []
            if colour_type == 3:
                chunks.append(
                    (b"PLTE", b"".join(bytes([index * 255 // top] * 3) for index in range(top + 1)))
                )
            samples = {0: [mid], 2: [mid] * 3, 3: [mid], 4: [mid, top], 6: [mid] * 3 + [top]}[colour_type]
            data = png(4, 3, samples, bit_depth=depth, colour_type=colour_type, extra_chunks=chunks)
            expected = round(mid / top * 255) if colour_type != 3 else mid * 255 // top
            cases.append(pytest.param(data, expected, id=f"colour{colour_type}-bits{depth}"))
    return cases


@pytest.mark.parametrize(("data", "grey"), _png_layout_cases())
def test_every_png_layout_gives_its_grey(data, grey):
    assert np.abs(np.array(grey_of(data)) - grey).max() <= 1


def _saved(format, mode, colour, **options):
    buffer = io.BytesIO()
    Image.new(mode, (8, 8), colour).save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("format", "mode", "colour", "grey"),
    [
        ("BMP", "1", 1, 255),
        ("BMP", "L", 128, 128),
        ("BMP", "P", 128, 128),
        ("BMP", "RGB", (128, 128, 128), 128),
        ("BMP", "RGBA", (128, 128, 128, 255), 128),
        ("GIF", "L", 128, 128),
        ("GIF", "P", 128, 128),
        ("JPEG", "L", 128, 128),
        ("JPEG", "RGB", (128, 128, 128), 128),
        ("JPEG", "CMYK", (0, 0, 0, 128), 127),
        ("WEBP", "RGB", (128, 128, 128), 128),
        ("WEBP", "RGBA", (128, 128, 128, 255), 128),
        ("WEBP", "RGBA", (0, 0, 0, 0), 255),  # transparent: on white
        ("PNG", "P", 128, 128),
        ("TIFF", "I;16", 32768, 128),
        ("TIFF", "F", 0.5, 128),
        ("TIFF", "YCbCr", (128, 128, 128), 128),
        ("TIFF", "CMYK", (0, 0, 0, 128), 127),
    ],
)
def test_files_pillow_writes_in_each_mode_give_their_grey(format, mode, colour, grey):
    if mode == "P":  # a grey converted to the web palette
        buffer = io.BytesIO()
        Image.new("L", (8, 8), colour).convert("P").save(buffer, format=format)
        data = buffer.getvalue()
    else:
        data = _saved(format, mode, colour, **({"lossless": True} if format == "WEBP" else {}))
    assert np.abs(np.array(grey_of(data)) - grey).max() <= 2


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pillow_mode_becomes_8_bit_or_is_refused_naming_the_field(mode):
    image = Image.new(mode, (4, 4))
    if mode == "I":  # 32-bit pixels of a range no file told: a file's rawmode ("I;16S"...) does
        with pytest.raises(InputError) as refused:
            to_8_bit("image", image)
        assert refused.value.field == "image"
        assert to_8_bit("image", image, "I;16S").mode == "L"
        return
    result = to_8_bit("image", image)
    assert result.mode in EIGHT_BIT_MODES and result is not image
    assert as_rgb(result).mode == "RGB"
