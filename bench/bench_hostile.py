"""Hostile files: what each costs the Python worker that parses it, with the caps and without.

    .venv/bin/python bench/bench_hostile.py [--workdir data/bench/hostile] [--zeros-mb 200]

1. Writes the hostile corpus the tests use (``tests/dicom_files.build_hostile_folder``: an RLE file
   declaring 65535 x 65535 pixels, a consistent 1 x 1 file of 100000 frames, multi-frame CT Image
   Storage, burned-in annotation, secondary captures, a file of zeros of ``--zeros-mb``) plus one
   real CT slice for scale.
2. Parses each file the way an ingest worker does (``read_file``, ``parse_dicom`` with the shipped
   ``ParsePolicy``), each in a fresh Python process: outcome, seconds, and peak resident memory
   above the process's own after imports (``ru_maxrss``).
3. Parses the files the caps stop once more with the caps lifted, under an address-space limit of
   ``--uncapped-limit-gb`` (as ``ingest.worker_address_space`` sets it) and a timeout, to show what
   the caps save.

The last line of stdout is one JSON object with every figure; it is also written to
``<workdir>/hostile.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: One file parsed as a worker would; prints a JSON line. argv: path, lifted caps (0/1), limit bytes.
_PROBE = r"""
import json, resource, sys, time
from ctlake.core.deid import DEV_KEY, Pseudonymizer
from ctlake.core.dicom_parse import ParsePolicy, Rejection, parse_dicom, read_file
path, lifted, limit = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
policy = (ParsePolicy(max_decoded_bytes=2**62, max_frames=2**31, accept_burned_in_annotation=True,
                      accept_secondary_images=True) if lifted else ParsePolicy())
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
result = parse_dicom(read_file(path), Pseudonymizer(DEV_KEY), policy)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = result.reason if isinstance(result, Rejection) else f"slices:{len(result)}"
print(json.dumps({"outcome": outcome, "seconds": round(seconds, 3), "peak_mb_above_start": round((peak - base) / 1024, 1),
                  "message": result.message[:160] if isinstance(result, Rejection) else None}))
"""


def probe(path: Path, lifted: bool, limit_bytes: int, timeout: float) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(path), "1" if lifted else "0", str(limit_bytes)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": f"still running after {timeout:.0f} s (killed)"}
    if done.returncode != 0:
        return {"outcome": f"worker died (exit {done.returncode})", "stderr": done.stderr.strip()[-200:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="data/bench/hostile")
    parser.add_argument("--zeros-mb", type=int, default=200)
    parser.add_argument("--uncapped-limit-gb", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from dicom_files import build_hostile_folder, real

    folder = Path(args.workdir) / "files"
    shutil.rmtree(folder, ignore_errors=True)
    expected = build_hostile_folder(folder, zeros_bytes=args.zeros_mb * 2**20)
    shutil.copy(real("693_UNCR.dcm"), folder / "real_ct_512x512.dcm")
    expected["real_ct_512x512.dcm"] = "slices:1"
    limit = int(args.uncapped_limit_gb * 2**30)
    rows = []
    for name, want in expected.items():
        path = folder / name
        row = {"file": name, "bytes": path.stat().st_size, "expected": want,
               "shipped": probe(path, False, 0, args.timeout)}
        if want == "too_large_decoded":
            row["caps_lifted"] = probe(path, True, limit, args.timeout)
        rows.append(row)
        print(f"{name:36s} {row['bytes']:>11d} B  {row['shipped']['outcome']:22s} "
              f"{row['shipped'].get('seconds', '-'):>7} s  {row['shipped'].get('peak_mb_above_start', '-'):>7} MB"
              + (f"   caps lifted ({args.uncapped_limit_gb:g} GB limit): {row['caps_lifted']['outcome']} "
                 f"{row['caps_lifted'].get('seconds', '-')} s {row['caps_lifted'].get('peak_mb_above_start', '-')} MB"
                 if "caps_lifted" in row else ""))
    result = {"files": rows, "all_as_expected": all(r["shipped"]["outcome"] == r["expected"] for r in rows)}
    (Path(args.workdir) / "hostile.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0 if result["all_as_expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
