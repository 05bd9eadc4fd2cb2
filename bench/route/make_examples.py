#!/usr/bin/env python3
"""Labelled prompts for the context router from the shared tinymoe data (stdlib only).

  make_examples.py DATA_DIR OUT_DIR [--train N] [--bytes B]

writes OUT_DIR/train.json: N prompts of B bytes per domain (c, py, en), evenly spaced over
corpus-<d>.train.bin (the first 95 % of each domain), and OUT_DIR/heldout.json: every
consecutive B-byte prompt of eval-<d>.txt (the last 5 %, never seen in training). Prompts are
cut at UTF-8 character boundaries so they are valid JSON strings. The files hold excerpts of
Debian-packaged text: generate them, do not commit them.
"""
import argparse
import json
import os


def cut(data, start, length):
    """data[start:start+length] moved to UTF-8 character boundaries, decoded."""
    while start < len(data) and (data[start] & 0xC0) == 0x80:
        start += 1
    end = min(len(data), start + length)
    while end < len(data) and end > start and (data[end] & 0xC0) == 0x80:
        end -= 1
    return data[start:end].decode("utf-8", errors="replace")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--bytes", type=int, default=300)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    train, held = [], []
    for d in ("c", "py", "en"):
        corpus = open(os.path.join(a.data, "corpus-%s.train.bin" % d), "rb").read()
        step = (len(corpus) - a.bytes) // a.train
        train += [{"domain": d, "text": cut(corpus, i * step, a.bytes)} for i in range(a.train)]
        ev = open(os.path.join(a.data, "eval-%s.txt" % d), "rb").read()
        held += [{"domain": d, "text": cut(ev, i, a.bytes)} for i in range(0, len(ev) - a.bytes + 1, a.bytes)]
    for name, rows in (("train.json", train), ("heldout.json", held)):
        with open(os.path.join(a.out, name), "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False)
    print("%d training prompts, %d held-out prompts of %d bytes in %s" % (len(train), len(held), a.bytes, a.out))


if __name__ == "__main__":
    main()
