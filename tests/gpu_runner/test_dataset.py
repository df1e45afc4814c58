"""Tests for gpu_runner.dataset: hostile zips, hostile images, dataset preparation."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from events.settings import LimitSettings
from gpu_runner.dataset import (
    DatasetError,
    ImageInfo,
    _InflateBudget,
    prepare_dataset,
    safe_extract_zip,
    validate_image,
)
from tests.hostile.make_corpus import (
    ManifestEntry,
    RawMember,
    build_zip,
    generate,
    noise_jpeg,
    png_bytes,
)

LIMITS = LimitSettings()
MAX_PIXELS = LIMITS.max_image_pixels


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ManifestEntry]]:
    """The hostile corpus, generated once for this module."""
    root = tmp_path_factory.mktemp("corpus")
    return root, generate(root)


def listing(root: Path) -> set[str]:
    """Every path under `root` (files, folders, links), relative, links not followed."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(Path(dirpath, name).relative_to(root).as_posix())
    return found


def tree_files(root: Path) -> list[str]:
    """Regular files under `root`, relative and sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- #
# safe_extract_zip
# --------------------------------------------------------------------------- #


def test_every_corpus_archive_has_its_manifest_outcome(
    corpus: tuple[Path, list[ManifestEntry]], tmp_path: Path
) -> None:
    """Each hostile archive is refused with its code, or extracted with exactly
    the manifest's files and per-member reasons; nothing is written outside the
    destination, and a refused archive leaves no destination behind."""
    root, manifest = corpus
    escapes = [Path("/tmp/evil3.png"), Path("/tmp/boothd-corpus-evil.png")]
    existed = {p: p.exists() for p in escapes}
    problems: list[str] = []
    for entry in (e for e in manifest if e["kind"] == "zip"):
        sandbox = tmp_path / entry["file"]
        sandbox.mkdir()
        (sandbox / "sibling.txt").write_text("untouched")
        before = listing(sandbox)
        dest = sandbox / "dest"
        try:
            result = safe_extract_zip(root / entry["file"], dest, LIMITS)
        except DatasetError as exc:
            if entry["expect"] != "error" or exc.code != entry.get("code"):
                problems.append(f"{entry['file']}: unexpected DatasetError {exc.code}: {exc}")
            if listing(sandbox) != before:
                problems.append(f"{entry['file']}: left files behind: {listing(sandbox) - before}")
            continue
        if entry["expect"] != "extract":
            problems.append(f"{entry['file']}: expected {entry.get('code')}, got success")
            continue
        outside = {p for p in listing(sandbox) - before if not p.startswith("dest")}
        if outside:
            problems.append(f"{entry['file']}: wrote outside dest: {outside}")
        if tree_files(dest) != sorted(entry.get("extracted", [])):
            problems.append(f"{entry['file']}: extracted {tree_files(dest)}")
        if sorted(p.relative_to(dest).as_posix() for p in result.files) != tree_files(dest):
            problems.append(f"{entry['file']}: result.files disagrees with the disk")
        got = {r.name: r.reason for r in result.rejected}
        want = entry.get("rejected", {})
        if set(got) != set(want):
            problems.append(f"{entry['file']}: rejected {sorted(got)}, want {sorted(want)}")
        for name, fragment in want.items():
            if fragment not in got.get(name, ""):
                problems.append(f"{entry['file']}: {name!r} reason {got.get(name)!r}")
    assert not problems, "\n".join(problems)
    assert {p: p.exists() for p in escapes} == existed


def test_refused_archive_leaves_a_given_empty_folder_empty(
    corpus: tuple[Path, list[ManifestEntry]], tmp_path: Path
) -> None:
    """When dest_dir existed (empty) before, a refused archive leaves it empty."""
    root, _ = corpus
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DatasetError) as caught:
        safe_extract_zip(root / "bomb_ratio.zip", dest, LIMITS)
    assert caught.value.code == "zip_bomb"
    assert dest.is_dir() and listing(dest) == set()


def test_bomb_found_after_some_files_were_written_removes_them(tmp_path: Path) -> None:
    """A zip bomb detected after earlier members were extracted removes them too."""
    members = [RawMember(f"ok{i}.png".encode(), png_bytes()) for i in range(3)]
    members.append(RawMember(b"zeros.png", bytes(2 * 1024 * 1024), method=8))
    zip_path = tmp_path / "late_bomb.zip"
    zip_path.write_bytes(build_zip(members))
    limits = LimitSettings(max_zip_uncompressed_bytes=1024 * 1024, max_zip_ratio=10_000)
    with pytest.raises(DatasetError) as caught:
        safe_extract_zip(zip_path, tmp_path / "dest", limits)
    assert caught.value.code == "zip_bomb"
    assert not (tmp_path / "dest").exists()


def test_total_cap_counts_every_member(tmp_path: Path) -> None:
    """The uncompressed-bytes cap applies to the archive's total, not per member."""
    members = [RawMember(f"m{i}.png".encode(), os.urandom(300_000)) for i in range(4)]
    zip_path = tmp_path / "total.zip"
    zip_path.write_bytes(build_zip(members))
    with pytest.raises(DatasetError) as caught:
        safe_extract_zip(
            zip_path, tmp_path / "dest", LimitSettings(max_zip_uncompressed_bytes=1_000_000)
        )
    assert caught.value.code == "zip_bomb"
    result = safe_extract_zip(
        zip_path, tmp_path / "dest2", LimitSettings(max_zip_uncompressed_bytes=1_200_000)
    )
    assert len(result.files) == 4


def test_member_cap_is_configurable(tmp_path: Path) -> None:
    """`max_zip_members` counts every entry, folders included."""
    zip_path = tmp_path / "five.zip"
    zip_path.write_bytes(
        build_zip([RawMember(b"d/")] + [RawMember(f"d/{i}.txt".encode()) for i in range(4)])
    )
    with pytest.raises(DatasetError) as caught:
        safe_extract_zip(zip_path, tmp_path / "a", LimitSettings(max_zip_members=4))
    assert caught.value.code == "too_many_files"
    assert (
        len(safe_extract_zip(zip_path, tmp_path / "b", LimitSettings(max_zip_members=5)).files) == 4
    )


def test_inflate_budget_enforces_caps_on_bytes_produced() -> None:
    """Caps apply to bytes actually decompressed. (Python's zipfile stops at the
    declared size today, so an archive cannot exercise this path; the budget is
    what protects extraction if that ever changes.)"""
    budget = _InflateBudget(total_limit=10 * 1024 * 1024, ratio_limit=100)
    budget.start_member("small-but-lying.png", compressed_size=1000)
    budget.add(100_000)  # ratio 100 but under the 1 MiB floor: fine
    with pytest.raises(DatasetError) as caught:
        for _ in range(100):
            budget.add(64 * 1024)
    assert caught.value.code == "zip_bomb" and "expands more than 100" in caught.value.message
    total = _InflateBudget(total_limit=1000, ratio_limit=1e9)
    total.start_member("a", 10**9)
    total.add(1000)
    with pytest.raises(DatasetError):
        total.add(1)


def test_dest_must_be_empty(tmp_path: Path, corpus: tuple[Path, list[ManifestEntry]]) -> None:
    """Extraction refuses a non-empty destination rather than mixing files into it."""
    root, _ = corpus
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError):
        safe_extract_zip(root / "junk.zip", tmp_path / "dest", LIMITS)
    assert listing(tmp_path / "dest") == {"keep.txt"}


# Weighted towards names that survive the cheap checks (plain separators,
# image suffixes) so that the interesting cases — '..' and friends deep in
# otherwise ordinary paths — are reached often.
_COMPONENTS = st.sampled_from(
    [
        "..",
        "..",
        "..",
        ".",
        "",
        "a",
        "b",
        "dir",
        "~",
        "%2e%2e",
        "．．",
        "\u2025",
        " ",
        "…",
        "x\x00y",
        "__MACOSX",
        ".hidden",
        "CON",
        "é",
        "e\u0301",
        "A",
        "a",
    ]
)
_LAST = st.sampled_from(["a.png", "b.jpg", "c.txt", "A.PNG", "é.png", "e\u0301.png", "..", "x"])
_TEXT_NAMES = st.builds(
    lambda lead, parts, last, sep: (lead + sep.join([*parts, last])).encode("utf-8"),
    st.sampled_from(["", "", "", "/", "../", "./", "C:/", "\\"]),
    st.lists(_COMPONENTS, max_size=5),
    _LAST,
    st.sampled_from(["/", "/", "/", "//", "/./", "\\"]),
)
_NAMES = st.one_of(_TEXT_NAMES, _TEXT_NAMES, _TEXT_NAMES, st.binary(min_size=1, max_size=24))
_MEMBERS = st.lists(
    st.builds(
        RawMember,
        name=_NAMES,
        data=st.just(b"data"),
        flags=st.sampled_from([0, 0x800]),
        external_attr=st.sampled_from([0, 0o100644 << 16, 0o120777 << 16, 0o040755 << 16, 0x10]),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=_MEMBERS)
def test_random_member_names_never_escape_dest(members: list[RawMember]) -> None:
    """Whatever the member names, flags and modes, every file written lies
    inside dest, nothing appears beside it, and no symlink is ever created."""
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        zip_path = sandbox / "in.zip"
        zip_path.write_bytes(build_zip(members))
        before = listing(sandbox)
        dest = sandbox / "out" / "dest"
        try:
            result = safe_extract_zip(zip_path, dest, LIMITS)
        except DatasetError as exc:
            assert exc.code in ("invalid_zip", "encrypted_zip")
            assert listing(sandbox) == before
            return
        new = listing(sandbox) - before
        assert all(p == "out" or p == "out/dest" or p.startswith("out/dest/") for p in new)
        real_dest = dest.resolve()
        for path in result.files:
            assert path.resolve().is_relative_to(real_dest)
            assert path.is_file() and not path.is_symlink()
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in dirnames + filenames:
                assert not Path(dirpath, name).is_symlink()


_BASE_ZIP = build_zip(
    [
        RawMember(b"a/1.png", png_bytes(), method=8),
        RawMember(b"a/1.txt", b"caption"),
        RawMember(b"b.png", png_bytes()),
    ]
)
_DAMAGE = st.lists(
    st.tuples(st.integers(min_value=0, max_value=len(_BASE_ZIP) - 1), st.integers(0, 255)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(damage=_DAMAGE, cut=st.one_of(st.none(), st.integers(0, len(_BASE_ZIP))))
def test_damaged_archives_fail_cleanly(damage: list[tuple[int, int]], cut: int | None) -> None:
    """Any byte-level damage to an archive (forged versions, offsets, sizes,
    flags) ends in a DatasetError or a safe extraction — never another
    exception, never a file outside dest."""
    data = bytearray(_BASE_ZIP)
    for offset, value in damage:
        data[offset] = value
    with tempfile.TemporaryDirectory() as tmp:
        zip_path = Path(tmp) / "damaged.zip"
        zip_path.write_bytes(bytes(data[:cut]))
        dest = Path(tmp) / "dest"
        try:
            result = safe_extract_zip(zip_path, dest, LIMITS)
        except DatasetError:
            assert listing(Path(tmp)) == {"damaged.zip"}
            return
        assert all(p.resolve().is_relative_to(dest.resolve()) for p in result.files)
        assert listing(Path(tmp)) - {"damaged.zip"} == {"dest"} | {
            f"dest/{p}" for p in listing(dest)
        }


# --------------------------------------------------------------------------- #
# validate_image
# --------------------------------------------------------------------------- #


def test_every_corpus_image_has_its_manifest_outcome(
    corpus: tuple[Path, list[ManifestEntry]],
) -> None:
    """Hostile images (bombs, truncations, polyglots, empty files) are refused
    with a human reason; valid JPEG/PNG/WEBP/BMP/GIF are accepted."""
    root, manifest = corpus
    problems: list[str] = []
    for entry in (e for e in manifest if e["kind"] == "image"):
        outcome = validate_image(root / entry["file"], MAX_PIXELS)
        if entry["expect"] == "accepted":
            if not isinstance(outcome, ImageInfo) or outcome.format != entry.get("format"):
                problems.append(f"{entry['file']}: {outcome!r}")
        elif not isinstance(outcome, str) or entry.get("reason_contains", "") not in outcome:
            problems.append(f"{entry['file']}: {outcome!r}, want {entry.get('reason_contains')!r}")
    assert not problems, "\n".join(problems)


@settings(max_examples=150, deadline=None)
@given(
    which=st.sampled_from(["ok.jpg", "ok.png", "ok.webp", "ok.bmp", "animated.gif"]),
    damage=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    keep=st.floats(0.0, 1.0),
)
def test_damaged_images_give_a_reason_or_a_usable_image(
    corpus: tuple[Path, list[ManifestEntry]],
    which: str,
    damage: list[tuple[int, int]],
    keep: float,
) -> None:
    """Whatever the damage to a valid image, validate_image returns a reason or
    ImageInfo (never raises, never lets a warning out), and an image it accepts
    can be prepared."""
    root, _ = corpus
    data = bytearray((root / which).read_bytes())
    for offset, value in damage:
        data[offset % len(data)] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / which
        path.write_bytes(bytes(data[: max(1, int(len(data) * keep))]))
        outcome = validate_image(path, MAX_PIXELS)
        if isinstance(outcome, ImageInfo):
            prepared = prepare_dataset(
                [path], Path(tmp) / "out", 16, "random", 0, "p", None, 5, MAX_PIXELS
            )
            assert len(prepared.images) == 1
        else:
            assert isinstance(outcome, str) and outcome


def test_pixel_cap_is_inclusive(tmp_path: Path) -> None:
    """An image of exactly max_pixels is accepted; one pixel more is refused
    before decoding."""
    path = tmp_path / "img.png"
    path.write_bytes(png_bytes((10, 10)))
    assert isinstance(validate_image(path, 100), ImageInfo)
    reason = validate_image(path, 99)
    assert isinstance(reason, str) and "10×10" in reason


def test_animated_gif_reports_first_frame(corpus: tuple[Path, list[ManifestEntry]]) -> None:
    """Animated GIFs are accepted and flagged: only the first frame is used."""
    root, _ = corpus
    info = validate_image(root / "animated.gif", MAX_PIXELS)
    assert isinstance(info, ImageInfo) and info.animated


# --------------------------------------------------------------------------- #
# prepare_dataset
# --------------------------------------------------------------------------- #


def _save(path: Path, im: Image.Image, fmt: str, **params: object) -> Path:
    im.save(path, format=fmt, **params)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise) is
    turned upright, and the output carries no orientation tag."""
    im = Image.new("RGB", (64, 64), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 64, 32))  # stored: red top, blue bottom
    exif = Image.Exif()
    exif[0x0112] = 6
    src = _save(tmp_path / "sideways.jpg", im, "JPEG", exif=exif.tobytes(), quality=95)
    result = prepare_dataset(
        [src], tmp_path / "out", 32, "center", 0, "photo of sks dog", None, 10, MAX_PIXELS
    )
    out = Image.open(result.images[0].path)
    assert out.format == "PNG" and out.mode == "RGB" and out.size == (32, 32)
    # Rotating 90° clockwise moves the stored top (red) to the right side.
    right, left = out.getpixel((28, 16)), out.getpixel((3, 16))
    assert isinstance(right, tuple) and isinstance(left, tuple)
    assert right[0] > 200 and right[2] < 60, right
    assert left[2] > 200 and left[0] < 60, left
    assert out.getexif().get(0x0112) is None


def test_output_is_square_rgb_png_at_resolution(tmp_path: Path) -> None:
    """Every prepared image is an RGB PNG of resolution×resolution, whatever the
    source format, mode or shape (CMYK JPEG, palette GIF, 16-bit PNG, large JPEG)."""
    files = [
        _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        _save(tmp_path / "pal.gif", Image.new("P", (30, 50), 3), "GIF"),
        _save(tmp_path / "grey16.png", Image.new("I;16", (20, 20), 32896), "PNG"),
        tmp_path / "big.jpg",
        _save(tmp_path / "tiny.bmp", Image.new("RGB", (7, 5), (1, 2, 3)), "BMP"),
    ]
    files[3].write_bytes(noise_jpeg((1200, 900)))
    result = prepare_dataset(files, tmp_path / "out", 48, "center", 0, "p", None, 10, MAX_PIXELS)
    assert [i.source_name for i in result.images] == sorted(p.name for p in files)
    assert not result.rejected
    for image in result.images:
        with Image.open(image.path) as out:
            assert (out.format, out.mode, out.size) == ("PNG", "RGB", (48, 48))
    grey = Image.open(next(i.path for i in result.images if i.source_name == "grey16.png"))
    # 16-bit mid-grey stays mid-grey instead of clipping to white.
    assert grey.getpixel((24, 24)) == (128, 128, 128)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    """Transparent pixels become white; opaque ones keep their colour."""
    im = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 16, 32))
    src = _save(tmp_path / "alpha.png", im, "PNG")
    result = prepare_dataset([src], tmp_path / "out", 32, "center", 0, "p", None, 10, MAX_PIXELS)
    out = Image.open(result.images[0].path)
    assert out.getpixel((28, 16)) == (255, 255, 255)
    assert out.getpixel((3, 16)) == (0, 0, 255)


def test_center_crop_takes_the_middle(tmp_path: Path) -> None:
    """Center crop keeps the middle square of a wide image."""
    im = Image.new("RGB", (96, 32), (255, 0, 0))
    im.paste((0, 255, 0), (32, 0, 64, 32))
    im.paste((0, 0, 255), (64, 0, 96, 32))
    src = _save(tmp_path / "wide.png", im, "PNG")
    result = prepare_dataset([src], tmp_path / "out", 16, "center", 0, "p", None, 10, MAX_PIXELS)
    out = Image.open(result.images[0].path)
    assert out.getpixel((8, 8)) == (0, 255, 0)


def test_random_crop_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    """The same seed gives byte-identical outputs; different seeds pick
    different windows; center crop ignores the seed."""
    src = tmp_path / "wide.jpg"
    src.write_bytes(noise_jpeg((400, 60), seed=3))

    runs = 0

    def run(crop: Literal["center", "random"], seed: int) -> bytes:
        nonlocal runs
        runs += 1
        out = tmp_path / f"run{runs}"
        result = prepare_dataset([src], out, 32, crop, seed, "p", None, 10, MAX_PIXELS)
        return result.images[0].path.read_bytes()

    assert run("random", 1) == run("random", 1)
    assert len({run("random", seed) for seed in range(1, 6)}) > 1
    assert run("center", 1) == run("center", 2)


def test_captions_from_txt_files_else_instance_prompt(tmp_path: Path) -> None:
    """`NAME.txt` beside `NAME.jpg` is that image's caption (whitespace
    collapsed); images without one get the instance prompt; orphan and
    undecodable caption files are reported."""
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jpg").write_bytes(noise_jpeg(seed=ord(name)))
    (tmp_path / "a.txt").write_text("\ufeffa photo of sks dog\n  on the beach \n", encoding="utf-8")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "orphan.txt").write_text("nobody's caption")
    files = sorted(tmp_path.iterdir())
    result = prepare_dataset(
        files, tmp_path / "out", 32, "center", 0, "photo of sks dog", None, 10, MAX_PIXELS
    )
    captions = {i.source_name: i.caption for i in result.images}
    assert captions == {
        "a.jpg": "a photo of sks dog on the beach",
        "b.jpg": "photo of sks dog",
        "c.jpg": "photo of sks dog",
    }
    reasons = {r.name: r.reason for r in result.rejected}
    assert "not valid UTF-8" in reasons["c.txt"]
    assert "without a matching image" in reasons["orphan.txt"]


def test_concept_name_becomes_the_caption(tmp_path: Path) -> None:
    """With concept_name (RunPod's reading: images are renamed to the concept
    and file names are the prompts), images without their own caption file are
    captioned with concept_name instead of the instance prompt."""
    (tmp_path / "a.jpg").write_bytes(noise_jpeg(seed=1))
    (tmp_path / "b.jpg").write_bytes(noise_jpeg(seed=2))
    (tmp_path / "b.txt").write_text("explicit caption")
    result = prepare_dataset(
        sorted(tmp_path.iterdir()),
        tmp_path / "out",
        32,
        "center",
        0,
        "photo of sks dog",
        "ohwx person",
        10,
        MAX_PIXELS,
    )
    assert {i.source_name: i.caption for i in result.images} == {
        "a.jpg": "ohwx person",
        "b.jpg": "explicit caption",
    }


def test_source_names_relative_to_root(tmp_path: Path) -> None:
    """With `root`, source names are paths under it, so same-named files in
    different folders stay distinguishable, and captions pair within a folder."""
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "1.png").write_bytes(png_bytes())
    (tmp_path / "y" / "1.txt").write_text("from y")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    result = prepare_dataset(
        files, tmp_path / "out", 16, "center", 0, "default", None, 10, MAX_PIXELS, root=tmp_path
    )
    assert [(i.source_name, i.caption) for i in result.images] == [
        ("x/1.png", "default"),
        ("y/1.png", "from y"),
    ]


def test_invalid_images_are_reported_and_skipped(
    tmp_path: Path, corpus: tuple[Path, list[ManifestEntry]]
) -> None:
    """Unusable files are listed with their reasons; the good ones are prepared
    and numbered without gaps."""
    root, _ = corpus
    files = [
        root / n for n in ("ok.jpg", "truncated.jpg", "bomb_header.png", "empty.jpg", "ok.png")
    ]
    result = prepare_dataset(files, tmp_path / "out", 16, "center", 0, "p", None, 10, MAX_PIXELS)
    assert [i.path.name for i in result.images] == ["0000.png", "0001.png"]
    assert sorted(r.name for r in result.rejected) == [
        "bomb_header.png",
        "empty.jpg",
        "truncated.jpg",
    ]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.png", "0001.png"]


def test_no_valid_images_lists_every_reason(
    tmp_path: Path, corpus: tuple[Path, list[ManifestEntry]]
) -> None:
    """With no usable image the dataset is refused (`no_valid_images`), the error
    names each file and its reason, and the output folder is not left behind."""
    root, _ = corpus
    files = [root / n for n in ("truncated.jpg", "polyglot_ppm.png", "empty.jpg")]
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(files, tmp_path / "out", 16, "center", 0, "p", None, 10, MAX_PIXELS)
    err = caught.value
    assert err.code == "no_valid_images"
    assert {r.name for r in err.rejected} == {"truncated.jpg", "polyglot_ppm.png", "empty.jpg"}
    for name in ("truncated.jpg", "polyglot_ppm.png", "empty.jpg"):
        assert name in err.message
    assert not (tmp_path / "out").exists()


def test_too_many_images_is_refused_and_cleaned_up(tmp_path: Path) -> None:
    """More usable images than max_images is `too_many_images`; nothing is kept."""
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png_bytes(color=(i, 0, 0)))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(files, out, 16, "center", 0, "p", None, 2, MAX_PIXELS)
    assert caught.value.code == "too_many_images"
    assert listing(out) == set()
    assert (
        len(
            prepare_dataset(
                files, tmp_path / "ok", 16, "center", 0, "p", None, 3, MAX_PIXELS
            ).images
        )
        == 3
    )


def test_zip_to_dataset_end_to_end(tmp_path: Path) -> None:
    """An extracted zip feeds prepare_dataset: folders kept, captions paired,
    junk skipped, rejected members reported by the extractor."""
    jpeg = io.BytesIO()
    Image.new("RGB", (50, 40), (10, 200, 10)).save(jpeg, format="JPEG")
    zip_path = tmp_path / "upload.zip"
    zip_path.write_bytes(
        build_zip(
            [
                RawMember(b"dog/1.jpg", jpeg.getvalue()),
                RawMember(b"dog/1.txt", b"sks dog sitting"),
                RawMember(b"dog/2.png", png_bytes()),
                RawMember(b"__MACOSX/dog/._1.jpg", b"junk"),
                RawMember(b"../escape.png", png_bytes()),
            ]
        )
    )
    extracted = safe_extract_zip(zip_path, tmp_path / "files", LIMITS)
    assert [r.name for r in extracted.rejected] == ["../escape.png"]
    result = prepare_dataset(
        extracted.files,
        tmp_path / "prepared",
        16,
        "center",
        0,
        "photo of sks dog",
        None,
        10,
        MAX_PIXELS,
        root=tmp_path / "files",
    )
    assert [(i.source_name, i.caption) for i in result.images] == [
        ("dog/1.jpg", "sks dog sitting"),
        ("dog/2.png", "photo of sks dog"),
    ]


def test_pillow_bomb_warning_is_a_rejection_not_a_warning(
    corpus: tuple[Path, list[ManifestEntry]],
) -> None:
    """An image above Pillow's own warning threshold is refused with a reason,
    and no DecompressionBombWarning escapes (filterwarnings=error would fail
    the test if one did)."""
    root, _ = corpus
    reason = validate_image(root / "bomb_warning.png", 10**12)
    assert isinstance(reason, str) and "decompression bomb" in reason
