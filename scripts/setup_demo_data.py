#!/usr/bin/env python3
"""Build the Twemoji -> Noto emoji demo datasets from the emoji-datasource npm packages.

Input: the tarballs `emoji-datasource-twitter-16.0.0.tgz` and
`emoji-datasource-google-16.0.0.tgz` (fetched by `scripts/setup_demo_data.sh` with
`npm pack`) in the cache folder (default `.cache/demo`).

Steps (standard library only):
1. extract `package/emoji.json` and `package/img/{twitter,google}/64/*.png` into
   `<cache>/emoji-datasource-{twitter,google}/`;
2. list every image of `emoji.json` (base emoji and skin-tone variations) that both
   styles have;
3. composite each RGBA image on white and write it as RGB PNG at 64x64 and, box
   filtered (2x2 area average), at 32x32;
4. split by emoji: an emoji and all its skin-tone variations are held out when
   `sha256("adt-demo-split/" + base code points) mod 1000 < 100` (about 10%), the
   same in both styles;
5. write imagefolder datasets with `metadata.jsonl` lines `{"file_name", "text"}`:

       <cache>/data/{twemoji,noto}/{train,heldout}/        32x32
       <cache>/data-64px/{twemoji,noto}/{train,heldout}/   64x64

Captions: the lower-case Unicode name, the skin tone(s) for variations, and the
subcategory, e.g. "grinning face, face-smiling" or
"waving hand sign, medium skin tone, hand-fingers-open".

Idempotent: a stamp file records the inputs and the script version; when it matches,
nothing is done. Outputs are built in a temporary folder and renamed into place.
"""

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tarfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(ROOT, ".cache", "demo")
VERSION = "16.0.0"
# npm package style -> dataset name
STYLES = (("twitter", "twemoji"), ("google", "noto"))
SPLIT_SALT = "adt-demo-split/"
HELDOUT_PER_MILLE = 100
FORMAT_VERSION = "1"
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DemoDataError(Exception):
    pass


def tarball(cache, style):
    return os.path.join(cache, "emoji-datasource-%s-%s.tgz" % (style, VERSION))


# ---------------------------------------------------------------------------
# PNG reading / writing (non-interlaced; every colour type; bit depths 1..16)


def _unfilter(raw, height, stride, bpp, path):
    out = bytearray(height * stride)
    prev = bytearray(stride)
    pos = 0
    for y in range(height):
        if pos >= len(raw):
            raise DemoDataError("%s: image data ends at row %d of %d" % (path, y, height))
        ftype = raw[pos]
        line = bytearray(raw[pos + 1 : pos + 1 + stride])
        pos += 1 + stride
        if len(line) != stride:
            raise DemoDataError("%s: row %d is truncated" % (path, y))
        if ftype == 0:
            pass
        elif ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                if pa <= pb and pa <= pc:
                    pred = a
                elif pb <= pc:
                    pred = b
                else:
                    pred = c
                line[i] = (line[i] + pred) & 0xFF
        else:
            raise DemoDataError("%s: unknown PNG filter type %d in row %d" % (path, ftype, y))
        out[y * stride : (y + 1) * stride] = line
        prev = line
    return out


def _samples(row, width, channels, depth):
    """Unpack one unfiltered row into a list of samples (8-bit values or indices)."""
    n = width * channels
    if depth == 8:
        return list(row[:n])
    if depth == 16:
        return [row[2 * i] for i in range(n)]
    per_byte = 8 // depth
    mask = (1 << depth) - 1
    vals = []
    for i in range(n):
        byte = row[i // per_byte]
        shift = 8 - depth * (i % per_byte + 1)
        vals.append((byte >> shift) & mask)
    return vals


def read_png_rgba(path):
    """Decode a PNG file to (width, height, bytearray RGBA8)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != PNG_SIGNATURE:
        raise DemoDataError("%s: not a PNG file" % path)
    pos = 8
    ihdr = None
    palette = None
    trns = None
    idat = []
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if ctype == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif ctype == b"PLTE":
            palette = body
        elif ctype == b"tRNS":
            trns = body
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    if ihdr is None or not idat:
        raise DemoDataError("%s: PNG without IHDR or IDAT" % path)
    width, height, depth, color, _comp, _filt, interlace = ihdr
    if interlace != 0:
        raise DemoDataError("%s: interlaced PNGs are not supported" % path)
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if channels is None or depth not in (1, 2, 4, 8, 16):
        raise DemoDataError("%s: unsupported PNG colour type %d / depth %d" % (path, color, depth))
    if color == 3 and palette is None:
        raise DemoDataError("%s: palette PNG without PLTE" % path)
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise DemoDataError("%s: corrupt image data (%s)" % (path, e))
    bits = width * channels * depth
    stride = (bits + 7) // 8
    bpp = max(1, channels * depth // 8)
    pixels = _unfilter(raw, height, stride, bpp, path)
    out = bytearray(width * height * 4)
    scale = {1: 255, 2: 85, 4: 17, 8: 1, 16: 1}[depth]
    for y in range(height):
        s = _samples(pixels[y * stride : (y + 1) * stride], width, channels, depth)
        o = y * width * 4
        for x in range(width):
            if color == 6:
                r, g, b, a = s[4 * x : 4 * x + 4]
            elif color == 2:
                r, g, b = s[3 * x : 3 * x + 3]
                a = 255
            elif color == 4:
                r = g = b = s[2 * x]
                a = s[2 * x + 1]
            elif color == 0:
                r = g = b = s[x] * scale
                a = 255
            else:
                i = s[x]
                if 3 * i + 2 >= len(palette):
                    raise DemoDataError("%s: palette index %d out of range" % (path, i))
                r, g, b = palette[3 * i : 3 * i + 3]
                a = trns[i] if trns is not None and i < len(trns) else 255
            out[o + 4 * x : o + 4 * x + 4] = bytes((r, g, b, a))
    return width, height, out


def composite_on_white(rgba):
    """RGBA8 -> RGB8 over a white background (rounded)."""
    n = len(rgba) // 4
    out = bytearray(3 * n)
    for i in range(n):
        a = rgba[4 * i + 3]
        for c in range(3):
            v = rgba[4 * i + c]
            out[3 * i + c] = (v * a + 255 * (255 - a) + 127) // 255
    return out


def box_downsample(rgb, width, height, factor):
    """Area average over factor x factor blocks (RGB8), rounded to nearest."""
    if width % factor or height % factor:
        raise DemoDataError("image %dx%d is not divisible by %d" % (width, height, factor))
    w2, h2 = width // factor, height // factor
    area = factor * factor
    out = bytearray(3 * w2 * h2)
    for y in range(h2):
        for x in range(w2):
            for c in range(3):
                s = 0
                for dy in range(factor):
                    base = ((y * factor + dy) * width + x * factor) * 3 + c
                    for dx in range(factor):
                        s += rgb[base + 3 * dx]
                out[(y * w2 + x) * 3 + c] = (s + area // 2) // area
    return out


def write_png_rgb(path, width, height, rgb):
    def chunk(ctype, body):
        crc = zlib.crc32(ctype + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", crc)

    stride = 3 * width
    raw = b"".join(b"\x00" + bytes(rgb[y * stride : (y + 1) * stride]) for y in range(height))
    png = (
        PNG_SIGNATURE
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(png)


# ---------------------------------------------------------------------------


def extract(cache, style):
    """Extract emoji.json and the 64 px images of one package; returns the folder."""
    dest = os.path.join(cache, "emoji-datasource-%s" % style)
    stamp = os.path.join(dest, ".extracted-" + VERSION)
    if os.path.isfile(stamp):
        return dest
    tgz = tarball(cache, style)
    if not os.path.isfile(tgz):
        raise DemoDataError("%s is missing (run scripts/setup_demo_data.sh, which fetches it with npm pack)" % tgz)
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "img", style, "64"))
    prefix = "package/img/%s/64/" % style
    count = 0
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.name == "package/emoji.json":
                    rel = "emoji.json"
                elif m.name.startswith(prefix) and m.name.endswith(".png") and "/" not in m.name[len(prefix) :]:
                    rel = os.path.join("img", style, "64", m.name[len(prefix) :])
                    count += 1
                else:
                    continue
                with tar.extractfile(m) as src, open(os.path.join(tmp, rel), "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DemoDataError("%s: cannot read the tarball (%s); delete it and rerun" % (tgz, e))
    if not os.path.isfile(os.path.join(tmp, "emoji.json")):
        raise DemoDataError("%s: no package/emoji.json inside" % tgz)
    if count == 0:
        raise DemoDataError("%s: no %s*.png inside" % (tgz, prefix))
    open(os.path.join(tmp, ".extracted-" + VERSION), "w").close()
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def caption(entry, tones):
    name = entry.get("name") or entry.get("short_name") or entry["unified"]
    parts = [name.lower()]
    for t in tones:
        parts.append(SKIN_TONES.get(t, "skin tone " + t.lower()))
    sub = entry.get("subcategory")
    if sub:
        parts.append(sub)
    return ", ".join(parts)


def is_heldout(base_unified):
    h = hashlib.sha256((SPLIT_SALT + base_unified.upper()).encode()).digest()
    return int.from_bytes(h[:8], "big") % 1000 < HELDOUT_PER_MILLE


def list_items(emoji_json, src_dirs):
    """(file_name, caption, heldout) for every image present in every style."""
    with open(emoji_json, encoding="utf-8") as f:
        entries = json.load(f)
    items = []
    missing = {style: 0 for style, _ in STYLES}
    for e in entries:
        variants = [(e, [])]
        for key, v in sorted((e.get("skin_variations") or {}).items()):
            variants.append((v, key.split("-")))
        held = is_heldout(e["unified"])
        for v, tones in variants:
            image = v.get("image")
            if not image:
                continue
            present = True
            for style, _ in STYLES:
                if not os.path.isfile(os.path.join(src_dirs[style], image)):
                    missing[style] += 1
                    present = False
            if present:
                items.append((image, caption(e, tones), held))
    return items, missing


def build(cache):
    src_dirs = {}
    for style, _ in STYLES:
        src_dirs[style] = os.path.join(extract(cache, style), "img", style, "64")
    emoji_json = os.path.join(cache, "emoji-datasource-%s" % STYLES[0][0], "emoji.json")
    items, missing = list_items(emoji_json, src_dirs)
    if not items:
        raise DemoDataError("no emoji image is present in both styles")
    outs = {32: os.path.join(cache, "data"), 64: os.path.join(cache, "data-64px")}
    tmp = {size: path + ".tmp" for size, path in outs.items()}
    for t in tmp.values():
        shutil.rmtree(t, ignore_errors=True)
    counts = {}
    t0 = time.time()
    for style, name in STYLES:
        meta = {}
        for split in ("train", "heldout"):
            for size in outs:
                d = os.path.join(tmp[size], name, split)
                os.makedirs(d)
                meta[(size, split)] = open(os.path.join(d, "metadata.jsonl"), "w", encoding="utf-8")
        for i, (image, text, held) in enumerate(items):
            split = "heldout" if held else "train"
            w, h, rgba = read_png_rgba(os.path.join(src_dirs[style], image))
            if (w, h) != (64, 64):
                raise DemoDataError("%s: expected 64x64, found %dx%d" % (os.path.join(src_dirs[style], image), w, h))
            rgb = composite_on_white(rgba)
            write_png_rgb(os.path.join(tmp[64], name, split, image), 64, 64, rgb)
            write_png_rgb(os.path.join(tmp[32], name, split, image), 32, 32, box_downsample(rgb, 64, 64, 2))
            line = json.dumps({"file_name": image, "text": text}, ensure_ascii=False) + "\n"
            for size in outs:
                meta[(size, split)].write(line)
            counts[(name, split)] = counts.get((name, split), 0) + 1
            if (i + 1) % 500 == 0:
                print("  %s: %d / %d images (%.0f s)" % (name, i + 1, len(items), time.time() - t0), file=sys.stderr)
        for f in meta.values():
            f.close()
    for size, path in outs.items():
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp[size], path)
    return counts, missing


def stamp_text():
    with open(os.path.abspath(__file__), "rb") as f:
        script = hashlib.sha256(f.read()).hexdigest()
    return json.dumps({"version": VERSION, "format": FORMAT_VERSION, "script_sha256": script}, sort_keys=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=DEFAULT_CACHE, help="cache folder (default .cache/demo)")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args()
    cache = os.path.abspath(args.cache)
    stamp = os.path.join(cache, "data", ".complete")
    want = stamp_text()
    if not args.force and os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if f.read() == want:
                print("demo data: up to date in %s" % os.path.join(cache, "data"))
                return 0
    try:
        counts, missing = build(cache)
    except DemoDataError as e:
        print("setup_demo_data: %s" % e, file=sys.stderr)
        return 1
    with open(stamp, "w", encoding="utf-8") as f:
        f.write(want)
    for style, n in missing.items():
        if n:
            print("demo data: %d images listed in emoji.json are missing from the %s set (skipped)" % (n, style))
    for (name, split), n in sorted(counts.items()):
        print("demo data: %-8s %-8s %5d images" % (name, split, n))
    print("demo data: written to %s (32x32) and %s (64x64)" % (os.path.join(cache, "data"), os.path.join(cache, "data-64px")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
