#!/usr/bin/python3
"""Rate-distortion bench: s2lc against per-expert SVD, D2-MoE-style mean + delta SVD and int-N
round-to-nearest, all measured in this run on the shared tinymoe checkpoints.

For every checkpoint and ratio R it runs
  s2lc compress CKPT --ratio R [--calib C]      (time, peak memory)
  s2lc eval CKPT OUT.s2lc --calib C --baselines --json
                                                 (ratio_total, rel_fro, rel_out for s2lc, and for
                                                  SVD / D2 at the artifact's bytes, int-N)
  s2lc decompress OUT.s2lc -o RECON.safetensors
  eval.py CKPT --replace RECON --windows W       (bits per byte)
and the baselines through ../shared/tools/baseline.py (the reference implementation quoted in the
data set's README) + eval.py. Domain modules and LoRA sets get the error-vs-bytes table only.

Needs Debian's python3-torch, python3-numpy, python3-matplotlib (scripts/setup.sh --bench).
Usage: bench/rd/rd.py [--s2lc build-release/bin/s2lc] [--windows 32] [--out bench/rd] [--quick]
Prints the Markdown tables for bench/RESULTS.md and writes bench/rd/*.png and results.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
TINY = os.path.join(SHARED, "data", "tinymoe")
PY = "/usr/bin/python3"


def run(cmd):
    """Runs cmd; returns (stdout, seconds)."""
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"rd.py: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    return p.stdout, time.monotonic() - t0


def run_rss(cmd):
    """Runs cmd, returns (stdout, seconds, peak RSS MiB) using os.wait4 for this child alone."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        secs = time.monotonic() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode != 0:
        sys.exit(f"rd.py: {' '.join(cmd)} failed ({p.returncode}):\n{err}")
    return out, secs, usage.ru_maxrss / 1024.0


def bpb(ckpt, replace, windows):
    cmd = [PY, os.path.join(TINY, "eval.py"), ckpt, "--windows", str(windows)]
    if replace:
        cmd += ["--replace", replace]
    out, _ = run(cmd)
    return json.loads(out)["results"]["mean"]["bpb"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--s2lc", default=os.path.join(ROOT, "build-release", "bin", "s2lc"))
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "rd"))
    ap.add_argument("--quick", action="store_true", help="fewer ratios (smoke run)")
    ap.add_argument("--report", metavar="RESULTS_JSON", help="only print the tables and redraw the plot from a previous run")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.report:
        with open(args.report) as f:
            res = json.load(f)
        plot(res, args.out)
        print(markdown(res))
        return
    tmp = tempfile.mkdtemp(prefix="s2lc-rd-")
    s2lc = args.s2lc
    results = {"windows": args.windows, "models": {}, "modules": {}}

    # 3.556 and 4.571 are int4's and int3's ratios (16 / 4.5, 16 / 3.5): s2lc at exactly their bytes.
    models = {
        "moe-upcycled": ([3.556, 4, 4.571, 6, 8, 12, 16, 24, 32] if not args.quick else [8], "calib-moe-upcycled.safetensors"),
        "moe-scratch8": ([2, 3, 3.556, 4, 4.571, 6, 8] if not args.quick else [4], "calib-moe-scratch8.safetensors"),
    }
    for name, (ratios, calib) in models.items():
        ckpt = os.path.join(TINY, name + ".safetensors")
        cal = os.path.join(TINY, calib)
        m = {"bpb": bpb(ckpt, None, args.windows), "s2lc": [], "s2lc_calib": [], "svd": [], "d2": [], "int": []}
        print(f"[{name}] original bpb {m['bpb']:.4f}", file=sys.stderr)
        for R in ratios:
            for key, extra in (("s2lc", []), ("s2lc_calib", ["--calib", cal])):
                art = os.path.join(tmp, f"{name}-{R}{key}.s2lc")
                rec = os.path.join(tmp, f"{name}-{R}{key}.safetensors")
                _, secs, rss = run_rss([s2lc, "compress", ckpt, "-o", art, "--ratio", str(R), "--quiet"] + extra)
                ev = json.loads(run([s2lc, "eval", ckpt, art, "--calib", cal, "--baselines", "--json"])[0])["total"]
                run([s2lc, "decompress", art, "-o", rec])
                b = bpb(ckpt, rec, args.windows)
                row = {"target": R, "ratio": ev["ratio_total"], "bpb": b, "rel_fro": ev["rel_fro_error"], "rel_out": ev["rel_out_error"],
                       "seconds": secs, "mb_per_s": ev["original_bytes"] / 1e6 / secs, "peak_mib": rss}
                m[key].append(row)
                if key == "s2lc":
                    for bk in ("svd", "d2"):
                        bb = ev["baselines"][bk]
                        m.setdefault(bk + "_equal_bytes", []).append({"target": R, "ratio": bb["ratio"], "rel_fro": bb["rel_fro_error"], "rel_out": bb["rel_out_error"]})
                    m["int_errors"] = {k: ev["baselines"][k] for k in ("int8", "int4", "int3", "int2")}
                print(f"[{name}] {key} R={R}: ratio {row['ratio']:.3f} bpb {b:.4f} rel_out {row['rel_out']:.4f} {secs:.1f}s {rss:.0f}MiB", file=sys.stderr)
            for bk, flags in (("svd", []), ("d2", ["--mean"])):
                rec = os.path.join(tmp, f"{name}-{R}{bk}.safetensors")
                run([PY, os.path.join(SHARED, "tools", "baseline.py"), ckpt, str(R), rec] + flags)
                m[bk].append({"target": R, "ratio": baseline_ratio(bk, R), "bpb": bpb(ckpt, rec, args.windows)})
                print(f"[{name}] {bk} R={R}: bpb {m[bk][-1]['bpb']:.4f}", file=sys.stderr)
        for bits in (8, 4, 3, 2):
            rec = os.path.join(tmp, f"{name}-int{bits}.safetensors")
            run([PY, os.path.join(SHARED, "tools", "baseline.py"), ckpt, "0", rec, "--rtn", str(bits)])
            m["int"].append({"bits": bits, "ratio": 16 / (bits + 0.5), "bpb": bpb(ckpt, rec, args.windows)})
            print(f"[{name}] int{bits}: bpb {m['int'][-1]['bpb']:.4f}", file=sys.stderr)
        results["models"][name] = m

    # Domain modules and LoRA sets: error vs bytes against per-module SVD (eval --baselines).
    sets = {
        "domain-{c,py,en}": [os.path.join(TINY, f"domain-{d}.safetensors") for d in ("c", "py", "en")],
        "lora-{c,py,en}": [os.path.join(TINY, f"lora-{d}.safetensors") for d in ("c", "py", "en")],
        "lora-real (gpt2 x2 + distilbert)": sorted(
            os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(SHARED, "data", "lora-real")) for f in fs if f.endswith(".safetensors")),
    }
    for label, files in sets.items():
        rows = []
        for R in ([4, 8, 16, 32] if not args.quick else [4]):
            art = os.path.join(tmp, f"mod-{len(results['modules'])}-{R}.s2lc")
            run([s2lc, "compress", *files, "-o", art, "--ratio", str(R), "--quiet"])
            ev = json.loads(run([s2lc, "eval", *files, art, "--baselines", "--json"])[0])["total"]
            rows.append({"target": R, "ratio": ev["ratio_total"], "rel_fro": ev["rel_fro_error"],
                         "svd_ratio": ev["baselines"]["svd"]["ratio"], "svd_rel_fro": ev["baselines"]["svd"]["rel_fro_error"],
                         "int4_rel_fro": ev["baselines"]["int4"]["rel_fro_error"], "int4_ratio": ev["baselines"]["int4"]["ratio"]})
            print(f"[{label}] R={R}: {rows[-1]}", file=sys.stderr)
        results["modules"][label] = rows

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.out)
    print(markdown(results))


def baseline_ratio(kind, R, E=8, m=768, n=256):
    """The ratio baseline.py really reaches at nominal R on tinymoe ([768, 256] experts, E = 8):
    D2 keeps the mean expert at full size even when R asks for less, so it never passes E."""
    if kind == "svd":
        r = int((E * m * n / R) // (E * (m + n)))
        return E * m * n / max(1, r * E * (m + n))
    budget = E * m * n / R - m * n
    r = max(0, int(budget // (E * (m + n))))
    return E * m * n / (m * n + r * E * (m + n))


def pct(b, base):
    return 100.0 * (b / base - 1.0)


def markdown(res):
    out = []
    for name, m in res["models"].items():
        base = m["bpb"]
        out.append(f"#### {name} (original {base:.4f} bits/byte, {res['windows']} windows per domain)\n")
        out.append("| target R | s2lc ratio_total | s2lc Δbpb | s2lc rel_out | s2lc+calib Δbpb | s2lc+calib rel_out | SVD ratio | SVD Δbpb | SVD rel_out* | D2 ratio | D2 Δbpb | D2 rel_out* | compress s | MB/s | peak MiB |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for i, s in enumerate(m["s2lc"]):
            c, sv, d2 = m["s2lc_calib"][i], m["svd"][i], m["d2"][i]
            se, de = m["svd_equal_bytes"][i], m["d2_equal_bytes"][i]
            out.append(f"| {s['target']} | {s['ratio']:.3f} | {pct(s['bpb'], base):+.2f} % | {s['rel_out']:.4f} | {pct(c['bpb'], base):+.2f} % | {c['rel_out']:.4f} | "
                       f"{baseline_ratio('svd', s['target']):.2f} | {pct(sv['bpb'], base):+.2f} % | {se['rel_out']:.4f} | "
                       f"{baseline_ratio('d2', s['target']):.2f} | {pct(d2['bpb'], base):+.2f} % | {de['rel_out']:.4f} | "
                       f"{s['seconds']:.1f} | {s['mb_per_s']:.1f} | {s['peak_mib']:.0f} |")
        out.append("")
        out.append("| int-N (groups of 32, 16-bit scale) | ratio | Δbpb | rel_out |")
        out.append("| --- | --- | --- | --- |")
        for r in m["int"]:
            e = m["int_errors"][f"int{r['bits']}"]
            out.append(f"| int{r['bits']} | {r['ratio']:.2f} | {pct(r['bpb'], base):+.2f} % | {e['rel_out_error']:.4f} |")
        out.append("")
    out.append("#### Domain modules and LoRA sets (error vs bytes; SVD = per-module truncated SVD at the artifact's bytes)\n")
    out.append("| set | target R | s2lc ratio_total | s2lc rel_fro | SVD ratio | SVD rel_fro | int4 ratio | int4 rel_fro |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    def num(v, fmt):
        return "n/a (rank 0)" if v is None else format(v, fmt)

    for label, rows in res["modules"].items():
        for r in rows:
            out.append(f"| {label} | {r['target']} | {r['ratio']:.3f} | {r['rel_fro']:.4f} | {num(r['svd_ratio'], '.3f')} | {r['svd_rel_fro']:.4f} | "
                       f"{r['int4_ratio']:.2f} | {r['int4_rel_fro']:.4f} |")
    out.append("\n(*) rel_out of SVD / D2 computed by `s2lc eval --baselines` at the s2lc artifact's exact bytes; their Δbpb comes from `../shared/tools/baseline.py` at nominal R, whose real ratio is the 'ratio' column (D2 keeps the full mean expert, so it never passes 8x).")
    return "\n".join(out)


def plot(res, outdir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(res["models"]), figsize=(6 * len(res["models"]), 8), squeeze=False)
    for col, (name, m) in enumerate(res["models"].items()):
        base = m["bpb"]
        ax = axes[0][col]
        for key, style, label in (("s2lc", "o-", "s2lc"), ("s2lc_calib", "s--", "s2lc + calib"), ("svd", "v-", "per-expert SVD"), ("d2", "^-", "D2-style mean + delta SVD")):
            xs = [baseline_ratio(key, r["target"]) if key in ("svd", "d2") else r["ratio"] for r in m[key]]
            ys = [pct(r["bpb"], base) for r in m[key]]
            ax.plot(xs, ys, style, label=label)
        ax.plot([r["ratio"] for r in m["int"]], [pct(r["bpb"], base) for r in m["int"]], "kx", markersize=9, label="int8/4/3/2 RTN")
        for r in m["int"]:
            ax.annotate(f"int{r['bits']}", (r["ratio"], pct(r["bpb"], base)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("compression ratio (original expert bytes / all bytes kept)")
        ax.set_ylabel("Δ bits-per-byte vs original (%)")
        ax.set_title(f"{name}: eval.py bits-per-byte")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        ax.plot([r["ratio"] for r in m["s2lc"]], [r["rel_out"] for r in m["s2lc"]], "o-", label="s2lc")
        ax.plot([r["ratio"] for r in m["s2lc_calib"]], [r["rel_out"] for r in m["s2lc_calib"]], "s--", label="s2lc + calib")
        ax.plot([r["ratio"] for r in m["svd_equal_bytes"]], [r["rel_out"] for r in m["svd_equal_bytes"]], "v-", label="SVD (equal bytes)")
        ax.plot([r["ratio"] for r in m["d2_equal_bytes"]], [r["rel_out"] for r in m["d2_equal_bytes"]], "^-", label="D2 (equal bytes)")
        ax.plot([16 / (b + 0.5) for b in (8, 4, 3, 2)], [m["int_errors"][f"int{b}"]["rel_out_error"] for b in (8, 4, 3, 2)], "kx", markersize=9, label="int-N RTN")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("‖(W−Ŵ)X‖ / ‖WX‖ on calibration activations")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "rate-distortion.png"), dpi=110)


if __name__ == "__main__":
    main()
