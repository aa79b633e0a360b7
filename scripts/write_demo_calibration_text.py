"""Write ``models/demo/calibration.txt``: a slice of the demo model's *training* text, for the
calibration passes that need data from the training distribution (``dymoe export --quantizer gptq``,
``dymoe calibrate --collect-inputs``) without touching the held-out text the benchmarks score.

    python scripts/write_demo_calibration_text.py --out models/demo

The corpus is rebuilt exactly as ``train_demo_model.py`` builds it (same child interpreter, same
split); the held-out part it computes must equal the shipped ``heldout.txt`` byte for byte, so the
calibration text provably shares no document with it. Training documents are taken in sha256(name)
order (a fixed pseudo-random mix of topics and modules) until ``--max-bytes``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_demo_model as demo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/demo", help="the demo model folder (holds heldout.txt)")
    ap.add_argument("--max-bytes", type=int, default=96_000)
    ap.add_argument("--heldout-frac", type=float, default=0.05, help="must be the value the model was trained with")
    args = ap.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="dymoe-calib-") as tmp:
        docs = demo.load_corpus(Path(tmp))
    train, held = demo.split_corpus(docs, args.heldout_frac)
    heldout_blob = "".join(docs[n] + demo.EOS for n in held)
    shipped = (out / "heldout.txt").read_text(encoding="utf-8")
    if heldout_blob != shipped:
        raise SystemExit("the rebuilt held-out split differs from heldout.txt (another Python version?): "
                         "the calibration text could overlap it, so nothing was written")
    blob, size = [], 0
    for name in sorted(train, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        text = docs[name] + demo.EOS
        if size + len(text.encode()) > args.max_bytes:
            continue
        blob.append(text)
        size += len(text.encode())
    (out / "calibration.txt").write_text("".join(blob), encoding="utf-8")
    print(f"wrote {out / 'calibration.txt'}: {len(blob)} training documents, {size} bytes")


if __name__ == "__main__":
    main()
