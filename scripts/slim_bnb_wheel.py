#!/usr/bin/env python3
"""Slims a bitsandbytes wheel down to one CUDA native library.

    python3 scripts/slim_bnb_wheel.py WHEEL OUT_DIR [--cuda 130]

bitsandbytes' manylinux wheel ships a native library per CUDA, ROCm and XPU version
(``bitsandbytes/libbitsandbytes_*.so``, ~40 MiB compressed). This writes
``OUT_DIR/<same file name>`` keeping only ``libbitsandbytes_cuda<CUDA>.so`` (default
130, for torch built with CUDA 13.0; bitsandbytes picks the library from
``torch.version.cuda``) and the small ``libbitsandbytes_cpu.so`` (what bitsandbytes
loads where it sees no GPU, so the package still imports there), drops the other
native libraries, and rewrites ``*.dist-info/RECORD`` to list exactly the kept files
with their sha256 and size. Every other entry is copied byte for byte with its
original metadata (time stamp, permissions).
"""

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import sys
import zipfile

NATIVE = re.compile(r"^bitsandbytes/libbitsandbytes_[^/]+\.so$")


def record_hash(data: bytes) -> str:
    """A RECORD hash: ``sha256=`` + urlsafe base64 of the digest without padding."""
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def slim(wheel: str, out_dir: str, cuda: str) -> str:
    keep_native = {f"bitsandbytes/libbitsandbytes_cuda{cuda}.so", "bitsandbytes/libbitsandbytes_cpu.so"}
    out = os.path.join(out_dir, os.path.basename(wheel))
    if os.path.abspath(out) == os.path.abspath(wheel):
        raise SystemExit("OUT_DIR must differ from the wheel's directory")

    with zipfile.ZipFile(wheel) as src:
        infos = src.infolist()
        records = [i for i in infos if i.filename.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise SystemExit(f"{wheel}: expected one .dist-info/RECORD, found {len(records)}")
        record_info = records[0]
        natives = [i.filename for i in infos if NATIVE.match(i.filename)]
        wanted = f"bitsandbytes/libbitsandbytes_cuda{cuda}.so"
        if wanted not in natives:
            raise SystemExit(f"{wheel} has no {wanted}; it has: {', '.join(natives)}")

        kept = [i for i in infos if i is not record_info and (not NATIVE.match(i.filename) or i.filename in keep_native)]
        dropped = sorted(set(natives) - keep_native)

        os.makedirs(out_dir, exist_ok=True)
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        with zipfile.ZipFile(out, "w") as dst:
            for info in kept:
                data = src.read(info)
                if not info.is_dir():
                    writer.writerow([info.filename, record_hash(data), len(data)])
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            # RECORD lists itself with neither hash nor size, last as in the original.
            writer.writerow([record_info.filename, "", ""])
            dst.writestr(record_info, rows.getvalue().encode("utf-8"), compress_type=zipfile.ZIP_DEFLATED)

    print(f"dropped {len(dropped)} native libraries: {', '.join(os.path.basename(d) for d in dropped)}")
    print(f"kept: {', '.join(sorted(os.path.basename(k) for k in keep_native if k in natives))}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", help="bitsandbytes-*.whl")
    ap.add_argument("out_dir", help="directory for the slim wheel (same file name)")
    ap.add_argument("--cuda", default="130", help="CUDA version tag of the library to keep (default 130)")
    args = ap.parse_args()
    out = slim(args.wheel, args.out_dir, args.cuda)
    before, after = os.path.getsize(args.wheel), os.path.getsize(out)
    print(f"{args.wheel}: {before / 2**20:.1f} MiB")
    print(f"{out}: {after / 2**20:.1f} MiB ({100 * after / before:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
