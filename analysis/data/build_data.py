"""Build the default calibration / evaluation data shipped with quantplan.

This script is a one-off, reproducible build step.  It is NOT imported at
runtime and its extra dependencies (scikit-image, scikit-learn, matplotlib,
Pillow and the Debian ``fortunes`` package) are NOT runtime dependencies of
quantplan.  Everything it reads is available offline once those packages are
installed::

    apt-get install -y fortunes
    pip install scikit-image==0.26.0 scikit-learn matplotlib pillow
    python analysis/data/build_data.py

Outputs (all paths relative to this file's folder):

``text/calibration.txt``
    ~250 KB of natural English (roughly 80 % BSD ``fortune`` cookies, 20 %
    prose paragraphs of Python's ``pydoc_data.topics``).  One record per
    paragraph: every record is a single line (internal whitespace collapsed
    to single spaces) and records are separated by one blank line, so
    ``text.split("\\n\\n")`` recovers them.
``text/heldout.txt``
    ~60 KB in the same format and the same source mix, built from records
    disjoint from ``calibration.txt`` (checked on a normalised key, so not
    even a near-duplicate differing in case/punctuation is shared).
``images/*.jpg`` and ``images/prompts.json``
    Real colour photographs with clear licences, resized so the longer
    side is 256 px, saved as baseline JPEG quality 85, plus one prompt per
    image.

Determinism: input files are read in sorted order, the single shuffle uses
``random.Random(0)``, images are resized with Pillow's LANCZOS filter and
written without EXIF/ICC metadata.  Running the script twice gives
byte-identical outputs with the same versions of the source packages
(``pydoc_data`` text depends on the Python version; this set was built with
Python 3.11.7, fortunes 1:1.99.1-7.3, scikit-image 0.26.0, scikit-learn
1.9.1, matplotlib 3.11.2 and Pillow 13.0.0).
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT_DIR = HERE / "text"
IMAGE_DIR = HERE / "images"

SEED = 0
CALIBRATION_BYTES = 250_000
HELDOUT_BYTES = 60_000
PYDOC_SHARE = 0.20  # fraction of each text file taken from pydoc_data.topics
MIN_CHARS = 40
MAX_CHARS = 1_500  # very long records (whole stories, tables) are dropped
MIN_ALPHA_RATIO = 0.80  # letters + spaces; drops ASCII art, code, tables

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Files not used, besides *.dat / *.u8 and the offensive off/ directory:
#   ascii-art    pictures drawn with characters, not prose
#   ethnic       ethnic jokes: not something to ship as default data
#   songs-poems  verse (line structure is lost when whitespace is collapsed)
#                and lyrics of modern songs (highest copyright risk)
FORTUNES_SKIP = {"ascii-art", "ethnic", "songs-poems"}

IMAGE_LONG_SIDE = 256
JPEG_QUALITY = 85


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------

_OVERSTRIKE = re.compile(r".\x08")  # "_\bX" underline / "X\bX" bold
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Collapse a record to one readable line of NFC-normalised text."""
    text = _OVERSTRIKE.sub("", text)
    text = _CONTROL.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    return _SPACE.sub(" ", text).strip()


def dedupe_key(text: str) -> str:
    """Case- and punctuation-insensitive key used for duplicate detection."""
    return re.sub(r"[^0-9a-z]+", "", text.casefold())


def alpha_ratio(text: str) -> float:
    return sum(c.isalpha() or c == " " for c in text) / max(len(text), 1)


def keep(text: str) -> bool:
    return (
        MIN_CHARS <= len(text) <= MAX_CHARS
        and alpha_ratio(text) >= MIN_ALPHA_RATIO
    )


def fortune_records() -> list[str]:
    """Records of the Debian ``fortunes`` package, split on lines ``%``."""
    if not FORTUNES_DIR.is_dir():
        raise SystemExit(f"{FORTUNES_DIR} missing: apt-get install -y fortunes")
    records = []
    for path in sorted(FORTUNES_DIR.iterdir()):
        if (
            not path.is_file()
            or path.is_symlink()  # *.u8 are symlinks to the plain files
            or path.suffix in {".dat", ".u8"}
            or path.name in FORTUNES_SKIP
        ):
            continue  # also skips the off/ directory (offensive fortunes)
        raw = path.read_bytes().decode("utf-8", errors="replace")
        for chunk in re.split(r"^%[ \t]*$", raw, flags=re.M):
            text = normalise(chunk)
            if keep(text):
                records.append(text)
    return records


_UNDERLINE = re.compile(r"^\s*([*=\-^~\"'#+])\1{2,}\s*$")


def _is_code_block(paragraph: str) -> bool:
    lines = [ln for ln in paragraph.splitlines() if ln.strip()]
    if not lines:
        return True
    if any(tok in paragraph for tok in ("::=", ">>>", "...:")):
        return True
    # Indented paragraphs that do not end like a sentence are code samples,
    # grammar productions or tables.
    if all(ln.startswith("   ") for ln in lines) and not paragraph.rstrip().endswith((".", "?", "!")):
        return True
    return False


def pydoc_records() -> list[str]:
    """Prose paragraphs of the Python reference manual (``pydoc_data``)."""
    from pydoc_data.topics import topics

    records = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = [ln for ln in paragraph.splitlines() if not _UNDERLINE.match(ln)]
            paragraph = "\n".join(lines)
            if _is_code_block(paragraph):
                continue
            text = normalise(paragraph)
            # Drop headings / short lead-ins and list fragments.
            if (
                keep(text)
                and text[-1] in ".?!:)"
                and " " in text
                and not re.fullmatch(r"[\w.]+\(.*\)", text)  # signature line
            ):
                records.append(text)
    return records


def take(records: list[str], budget: int) -> tuple[list[str], list[str]]:
    """Take records from the front until ``budget`` UTF-8 bytes are used."""
    taken, size = [], 0
    for i, rec in enumerate(records):
        if size >= budget:
            return taken, records[i:]
        taken.append(rec)
        size += len(rec.encode("utf-8")) + 2  # + record separator
    return taken, []


def build_text() -> dict:
    rng = random.Random(SEED)
    seen: set[str] = set()
    pools: dict[str, list[str]] = {}
    for source, records in (("fortunes", fortune_records()), ("pydoc", pydoc_records())):
        pool = []
        for rec in records:
            key = dedupe_key(rec)
            if key in seen:
                continue
            seen.add(key)
            pool.append(rec)
        rng.shuffle(pool)
        pools[source] = pool

    calibration, heldout = [], []
    for source, share in (("fortunes", 1 - PYDOC_SHARE), ("pydoc", PYDOC_SHARE)):
        cal, rest = take(pools[source], int(CALIBRATION_BYTES * share))
        held, _ = take(rest, int(HELDOUT_BYTES * share))
        calibration += cal
        heldout += held
    rng.shuffle(calibration)
    rng.shuffle(heldout)

    cal_keys = {dedupe_key(r) for r in calibration}
    assert not cal_keys & {dedupe_key(r) for r in heldout}, "overlap"

    TEXT_DIR.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, recs in (("calibration.txt", calibration), ("heldout.txt", heldout)):
        body = "\n\n".join(recs) + "\n"
        (TEXT_DIR / name).write_text(body, encoding="utf-8", newline="\n")
        stats[name] = {"records": len(recs), "chars": len(body), "bytes": len(body.encode())}
    return stats


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------

# Licences as stated in each package's docstring / README (see LICENSES.md).
SKIMAGE_PD = "public domain (no known copyright restrictions), per scikit-image docstring"
IMAGES = [
    # file, loader key, crop box (left, upper, right, lower) or None, prompt, source, licence
    ("astronaut.jpg", "astronaut", None, "Describe this image.",
     "scikit-image 0.26 skimage.data.astronaut(): NASA photo of astronaut Eileen Collins",
     SKIMAGE_PD),
    ("chelsea.jpg", "chelsea", None, "What animal is in this picture?",
     "scikit-image 0.26 skimage.data.chelsea(): Chelsea the cat, photo by Stefan van der Walt",
     "CC0 (photographer Stefan van der Walt), per scikit-image docstring"),
    ("coffee.jpg", "coffee", None, "What is on the table in this photo?",
     "scikit-image 0.26 skimage.data.coffee(): coffee cup, photo by Rachel Michetti, courtesy of Pikolo Espresso Bar",
     "CC0 (photographer Rachel Michetti), per scikit-image docstring"),
    ("rocket.jpg", "rocket", None, "What is happening in this picture?",
     "scikit-image 0.26 skimage.data.rocket(): SpaceX photo of the Falcon 9 / DSCOVR launch",
     "public domain (released by SpaceX), per scikit-image docstring"),
    ("hubble_deep_field.jpg", "hubble_deep_field", None, "What is shown in this photo?",
     "scikit-image 0.26 skimage.data.hubble_deep_field(): NASA Hubble eXtreme Deep Field",
     "public domain (NASA), per scikit-image docstring"),
    ("hubble_deep_field_crop_a.jpg", "hubble_deep_field", (0, 0, 436, 436),
     "How many bright objects can you see in this image?",
     "crop (top-left 436x436 px) of scikit-image 0.26 skimage.data.hubble_deep_field()",
     "public domain (NASA), per scikit-image docstring"),
    ("hubble_deep_field_crop_b.jpg", "hubble_deep_field", (564, 436, 1000, 872),
     "Describe the colours and shapes in this picture.",
     "crop (bottom-right 436x436 px) of scikit-image 0.26 skimage.data.hubble_deep_field()",
     "public domain (NASA), per scikit-image docstring"),
    ("immunohistochemistry.jpg", "immunohistochemistry", None,
     "What kind of image is this, and what does it show?",
     "scikit-image 0.26 skimage.data.immunohistochemistry(): IHC-stained colonic glands, "
     "Center for Microscopy And Molecular Imaging (CMMI)",
     "no known copyright restrictions, per scikit-image docstring"),
    ("retina.jpg", "retina", None, "What part of the body is shown in this photograph?",
     "scikit-image 0.26 skimage.data.retina(): fundus photograph by Mikael Häggström (Wikimedia Commons)",
     "CC0 1.0, per scikit-image docstring"),
    ("china.jpg", "sklearn:china.jpg", None, "Describe the building in this photo.",
     "scikit-learn sklearn.datasets.load_sample_images() china.jpg, Flickr user danielbuechele "
     "(https://www.flickr.com/photos/danielbuechele/6061409035/)",
     "CC-BY-2.0 (https://creativecommons.org/licenses/by/2.0/), attribution: danielbuechele"),
    ("flower.jpg", "sklearn:flower.jpg", None, "What kind of plant is this?",
     "scikit-learn sklearn.datasets.load_sample_images() flower.jpg, Flickr user vultilion "
     "(https://www.flickr.com/photos/vultilion/6056698931/)",
     "CC-BY-2.0 (https://creativecommons.org/licenses/by/2.0/), attribution: vultilion"),
    ("grace_hopper.jpg", "matplotlib:grace_hopper.jpg", None, "Describe the person in this photo and what they are wearing.",
     "matplotlib mpl-data/sample_data/grace_hopper.jpg: official US Navy portrait of Commodore Grace M. Hopper",
     "public domain (US Navy official photograph; added to matplotlib as a public-domain image in PR #1599)"),
]


def _load(key: str):
    from PIL import Image

    if key.startswith("sklearn:"):
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / key.split(":", 1)[1]
        return Image.open(path).convert("RGB")
    if key.startswith("matplotlib:"):
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / key.split(":", 1)[1]
        return Image.open(path).convert("RGB")
    import skimage.data

    array = getattr(skimage.data, key)()
    return Image.fromarray(array).convert("RGB")


def build_images() -> list[dict]:
    from PIL import Image

    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    entries = []
    for file, key, box, prompt, source, licence in IMAGES:
        if key not in cache:
            cache[key] = _load(key)
        img = cache[key]
        if box is not None:
            img = img.crop(box)
        scale = IMAGE_LONG_SIDE / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        img.save(IMAGE_DIR / file, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        entries.append({"file": file, "prompt": prompt, "source": source, "licence": licence})
    (IMAGE_DIR / "prompts.json").write_text(
        json.dumps(entries, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return entries


def main() -> None:
    stats = build_text()
    for name, s in stats.items():
        print(f"text/{name}: {s['records']} records, {s['chars']} chars, {s['bytes']} bytes")
    for entry in build_images():
        path = IMAGE_DIR / entry["file"]
        print(f"images/{entry['file']}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
