#!/usr/bin/env python3
"""Regenerates the small real-weight fixtures in tests/data from ../shared/data (CC0 tinymoe).

Uses only the Python standard library and writes safetensors independently of s2lc's own writer,
so the fixtures also cross-check the C++ reader. Tensor bytes are copied unchanged.

    python3 scripts/make_fixtures.py [--shared ../shared/data]
"""
import argparse
import json
import os
import re
import struct


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {k: (v["dtype"], v["shape"], blob[base + v["data_offsets"][0]: base + v["data_offsets"][1]])
               for k, v in header.items()}
    return meta, tensors


def write_safetensors(path, tensors, meta):
    header = {"__metadata__": meta} if meta else {}
    off = 0
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * ((8 - len(js) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(js)))
        f.write(js)
        for _, (_, _, data) in tensors.items():
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def slice_file(src, dst, pattern, note):
    meta, tensors = read_safetensors(src)
    rx = re.compile(pattern)
    keep = {k: v for k, v in sorted(tensors.items()) if rx.search(k)}
    meta = dict(meta)
    meta["s2lc_fixture"] = f"{note}; tensors matching {pattern!r} of {os.path.basename(src)}, bytes unchanged (CC0)"
    write_safetensors(dst, keep, meta)
    print(f"{dst}: {len(keep)} tensors, {os.path.getsize(dst)} bytes")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", default=os.path.join(here, "..", "..", "shared", "data"))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data"))
    a = ap.parse_args()
    tiny = os.path.join(a.shared, "tinymoe")
    os.makedirs(a.out, exist_ok=True)
    slice_file(os.path.join(tiny, "moe-upcycled.safetensors"), os.path.join(a.out, "tinymoe-upcycled-L1.safetensors"),
               r"^layers\.1\.moe\.", "layer 1 MoE (router + 8 SwiGLU experts) of tinymoe moe-upcycled")
    slice_file(os.path.join(tiny, "calib-moe-upcycled.safetensors"), os.path.join(a.out, "tinymoe-upcycled-L1-calib.safetensors"),
               r"^(layers\.1\.|token_)", "layer-1 calibration activations of tinymoe moe-upcycled")
    slice_file(os.path.join(tiny, "lora-c.safetensors"), os.path.join(a.out, "tinymoe-lora-c.safetensors"),
               r".", "rank-8 PEFT LoRA (c domain) of the tinymoe dense base")


if __name__ == "__main__":
    main()
