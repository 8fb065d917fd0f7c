#!/usr/bin/env python3
"""Convert pytorch-fid's FID Inception-v3 weights to safetensors for `adt eval`.

The standard FID feature network is pytorch-fid's port of the TensorFlow FID Inception-v3
(`pt_inception-2015-12-05-6726825d.pth`, released with pytorch-fid on GitHub). This
repository cannot download it; fetch it yourself, then run

    python3 scripts/convert_inception.py pt_inception-2015-12-05-6726825d.pth weights/inception-v3
    adt eval --features inception-v3 --features-path weights/inception-v3 \\
        --generated GEN_DIR --reference REF_DIR

The output folder gets

    model.safetensors  every weight of the file under its pytorch-fid name
                       (Conv2d_1a_3x3.conv.weight, ..., Mixed_7c.branch_pool.bn.running_var,
                       fc.weight, fc.bias), as float32; BatchNorm num_batches_tracked
                       counters are dropped
    config.json        model_type, feature size, the source file name and its sha256

Reading the .pth file: if `import torch` works for this Python, torch.load is used
(weights_only=True). Otherwise the file is read with the standard library only: both the
legacy (pre-1.6) and the zip torch.save formats are understood (the legacy reader is the
one of scripts/convert_efficientnet.py). `--reader torch|stdlib` forces one of the two.

A file named like `...-<8 hex digits>.pth` (the torch.hub convention of the released file)
must have a sha256 that starts with those digits, or the conversion stops: the download is
damaged (`--no-hash-check` skips this check).

Usage: convert_inception.py [--reader auto|torch|stdlib] [--no-hash-check] INPUT.pth OUTPUT_DIR
"""

import argparse
import collections
import ctypes
import hashlib
import io
import json
import os
import re
import sys
import zipfile
from array import array

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert_efficientnet as ce  # noqa: E402  (legacy torch.save reader, safetensors writer)

MODEL_TYPE = "pytorch_fid_inception_v3"
RELEASED_NAME = "pt_inception-2015-12-05-6726825d.pth"

# A few tensors whose names and shapes identify pytorch-fid's FID Inception-v3
# (the full, strict check happens when adt loads the file).
SIGNATURE = {
    "Conv2d_1a_3x3.conv.weight": [32, 3, 3, 3],
    "Conv2d_4a_3x3.bn.running_var": [192],
    "Mixed_5b.branch_pool.conv.weight": [32, 192, 1, 1],
    "Mixed_6e.branch7x7dbl_5.conv.weight": [192, 192, 1, 7],
    "Mixed_7c.branch3x3dbl_3b.conv.weight": [384, 384, 3, 1],
    "Mixed_7c.branch_pool.conv.weight": [192, 2048, 1, 1],
}


class ConvertError(Exception):
    pass


def log(msg):
    print(f"convert_inception: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- readers


def _coalesce(size, stride):
    """The same strided view with size-1 dimensions dropped and every run of dimensions
    that is contiguous within itself merged into one, so that a view whose rows are
    contiguous is copied row by row (not one element at a time)."""
    dims = [(d, s) for d, s in zip(size, stride) if d != 1]
    out = []
    for d, s in dims:
        if out and out[-1][1] == s * d:
            out[-1] = (out[-1][0] * d, s)
        else:
            out.append((d, s))
    return [d for d, _ in out], [s for _, s in out]


def _gather(storage, esize, offset, size, stride, _strided=ce.gather_strided):
    """ce.gather_strided with a fast path for contiguous tensors (all of a state dict)
    and merged dimensions for the other views."""
    if any(d == 0 for d in size):
        return b""
    if size:
        size, stride = _coalesce(size, stride)
    numel = 1
    expect = []
    for d in reversed(size):
        expect.append(numel)
        numel *= d
    if list(stride) == expect[::-1] and numel > 0:
        start, end = offset * esize, (offset + numel) * esize
        if offset < 0 or end > len(storage):
            raise IndexError("strided view outside the storage")
        return bytes(storage[start:end])
    return _strided(storage, esize, offset, size, stride)


# The legacy reader looks the function up in its module: give it the fast path too.
ce.gather_strided = _gather


def read_with_torch(path, torch):
    """{name: (dtype, shape, bytes)} through torch.load, every tensor as float32."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"{path}: torch.load failed: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: top-level object is {type(obj).__name__}, expected a state dict")
    out = collections.OrderedDict()
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise ConvertError(f"{path}: entry {name} is {type(t).__name__}, expected a tensor")
        if name.endswith("num_batches_tracked"):
            continue
        if not t.is_floating_point():
            raise ConvertError(f"{path}: tensor {name} has dtype {t.dtype}, expected floating point")
        t = t.detach().to(torch.float32).contiguous()
        out[name] = ("F32", list(t.shape), ctypes.string_at(t.data_ptr(), t.numel() * 4))
    return out


def read_zip_state_dict(path):
    """{name: (dtype, shape, bytes)} of a zip-format torch.save file, standard library only."""
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ConvertError(f"{path}: not a zip file ({e})") from e
    with z:
        names = z.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ConvertError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in names:
            order = z.read(prefix + "byteorder").decode().strip()
            if order != "little":
                raise ConvertError(f"{path}: byte order {order!r} is not supported")
        up = ce._LegacyUnpickler(io.BytesIO(z.read(pickles[0])), path)
        try:
            obj = up.load()
        except ce.ConvertError as e:
            raise ConvertError(str(e)) from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ConvertError(f"{path}: top-level object is {type(obj).__name__}, expected a state dict")
        raw = {}
        for key, st in up.storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ConvertError(f"{path}: storage {key} ({member}) is missing from the archive")
            buf = z.read(member)
            _, esize = ce.STORAGE_TYPES[st.storage_type.name]
            if len(buf) != st.numel * esize:
                raise ConvertError(
                    f"{path}: storage {key} has {len(buf)} bytes, expected {st.numel} x {esize}"
                )
            raw[key] = buf
    out = collections.OrderedDict()
    for name, t in obj.items():
        if not isinstance(t, ce._TensorRef):
            raise ConvertError(f"{path}: entry {name} is {type(t).__name__}, expected a tensor")
        dtype, esize = ce.STORAGE_TYPES[t.storage.storage_type.name]
        try:
            buf = _gather(raw[t.storage.key], esize, t.offset, t.size, t.stride)
        except IndexError as e:
            raise ConvertError(f"{path}: tensor {name} runs past the end of its storage") from e
        out[name] = (dtype, list(t.size), buf)
    return out


def read_stdlib(path):
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        if magic[:2] == b"PK":
            tensors = read_zip_state_dict(path)
        else:
            tensors = ce.read_legacy_state_dict(path)
    except ce.ConvertError as e:
        raise ConvertError(str(e)) from e
    out = collections.OrderedDict()
    for name, (dtype, shape, buf) in tensors.items():
        if name.endswith("num_batches_tracked"):
            continue
        if dtype == "F32":
            pass
        elif dtype == "F64":
            buf = array("f", array("d", buf)).tobytes()
        else:
            raise ConvertError(f"{path}: tensor {name} has dtype {dtype}, expected float32 or float64")
        out[name] = ("F32", shape, buf)
    if sys.byteorder != "little":
        raise ConvertError("the standard-library reader needs a little-endian machine")
    return out


# ---------------------------------------------------------------- checks and output


def check_tensors(path, tensors):
    if any(k.startswith("AuxLogits.") for k in tensors):
        raise ConvertError(
            f"{path}: has AuxLogits.* tensors: this is torchvision's ImageNet Inception-v3, "
            f"not pytorch-fid's FID Inception ({RELEASED_NAME})"
        )
    for name, shape in SIGNATURE.items():
        if name not in tensors:
            raise ConvertError(
                f"{path}: no tensor {name}: not pytorch-fid's FID Inception-v3 state dict "
                f"(expected the names of {RELEASED_NAME})"
            )
        if tensors[name][1] != shape:
            raise ConvertError(f"{path}: tensor {name} has shape {tensors[name][1]}, expected {shape}")
    fc = tensors.get("fc.weight")
    if fc is not None and fc[1] != [1008, 2048]:
        raise ConvertError(
            f"{path}: fc.weight has shape {fc[1]}, expected [1008, 2048] (the FID Inception has "
            "1008 classes; 1000 means torchvision's ImageNet weights)"
        )


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_torch():
    """torch, or None with the reason."""
    try:
        import torch  # noqa: PLC0415

        return torch, None
    except Exception as e:  # noqa: BLE001  (ImportError, or OSError for missing CUDA libraries)
        return None, f"{type(e).__name__}: {e}"


def convert(src, out_dir, reader, hash_check=True):
    if not os.path.isfile(src):
        raise ConvertError(f"{src}: no such file")
    sha = sha256_of(src)
    m = re.search(r"-([0-9a-f]{8,})\.pth?$", os.path.basename(src))
    if hash_check and m and not sha.startswith(m.group(1)):
        raise ConvertError(
            f"{src}: sha256 {sha} does not start with {m.group(1)} as its name says: the file is "
            "damaged (--no-hash-check converts it anyway)"
        )
    used = reader
    if reader in ("auto", "torch"):
        torch, why = import_torch()
        if torch is None:
            if reader == "torch":
                raise ConvertError(f"--reader torch: `import torch` fails ({why})")
            log(f"`import torch` fails ({why}); reading {src} with the standard-library reader")
            used = "stdlib"
        else:
            used = "torch"
            log(f"reading {src} with torch.load (torch {torch.__version__})")
            tensors = read_with_torch(src, torch)
    if used == "stdlib":
        if reader == "stdlib":
            log(f"reading {src} with the standard-library reader")
        tensors = read_stdlib(src)
    check_tensors(src, tensors)
    st_path = os.path.join(out_dir, "model.safetensors")
    ce.write_safetensors(
        tensors, st_path, {"format": "pt", "source": os.path.basename(src), "source_sha256": sha}
    )
    config = {
        "model_type": MODEL_TYPE,
        "feature_dim": 2048,
        "image_size": 299,
        "batch_norm_epsilon": 1e-3,
        "num_tensors": len(tensors),
        "source_file": os.path.basename(src),
        "source_sha256": sha,
        "reader": used,
    }
    ce.atomic_write(os.path.join(out_dir, "config.json"), [json.dumps(config, indent=2).encode() + b"\n"])
    log(f"wrote {len(tensors)} float32 tensors to {st_path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help=f"the .pth file ({RELEASED_NAME})")
    ap.add_argument("output", help="output folder (created)")
    ap.add_argument("--reader", choices=["auto", "torch", "stdlib"], default="auto")
    ap.add_argument("--no-hash-check", action="store_true", help="skip the sha256 check of the file name")
    args = ap.parse_args()
    try:
        convert(args.input, args.output, args.reader, hash_check=not args.no_hash_check)
    except (ConvertError, ce.ConvertError, OSError) as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
