"""Peak memory and time of decoding one uploaded image, per format and size (not a test).

What `max_pixels` in serve_config.yaml is chosen from: each case decodes one image with the endpoint's own code
(`genderid.http_inputs.decode_upload`, no pixel limit) in a fresh process and reports the growth of its peak
resident memory over what it held before. Images are made compressible, as a hostile upload would be, so that
they fit the 10 MB body limit.

    python benchmarks/decode_memory.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAKE = r'''
import sys
import numpy as np
from PIL import Image
mode, fmt, w, h, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tile = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
plane = np.tile(tile, (h // 64 + 1, w // 64 + 1))[:h, :w]
if mode == "RGBA":
    img = Image.fromarray(np.stack([plane] * 4, -1), "RGBA")
elif mode == "I;16":
    img = Image.fromarray(plane.astype(np.uint16) * 257)
else:
    img = Image.fromarray(np.stack([plane] * 3, -1), "RGB")
img.save(out, format=fmt, **({"quality": 50} if fmt in ("WEBP", "JPEG") else {}))
'''

MEASURE = r'''
import resource, sys, time
sys.path.insert(0, sys.argv[2])
from genderid.http_inputs import Limits, decode_upload
from genderid.preprocess import Preprocessing
data = open(sys.argv[1], "rb").read()
pre, limits = Preprocessing(image_size=(218, 178)), Limits(max_pixels=10**10)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
decode_upload(data, pre, limits)
print(len(data), time.perf_counter() - started, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
'''

CASES = [("RGBA", "PNG"), ("RGBA", "WEBP"), ("RGB", "PNG"), ("I;16", "PNG"), ("RGB", "JPEG")]
SIZES = [(4000, 4000), (5000, 5000), (6300, 6300)]


def main() -> None:
    repo = str(Path(__file__).resolve().parent.parent)
    work = Path(tempfile.mkdtemp(prefix="decode-memory-"))
    print(f"### Decode memory ({time.strftime('%Y-%m-%d')}; `python benchmarks/decode_memory.py`)\n")
    print("| image | megapixels | body MB | decode s | peak memory growth MB | MB per megapixel |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, fmt in CASES:
        for width, height in SIZES:
            path = work / "image.bin"
            subprocess.run([sys.executable, "-c", MAKE, mode, fmt, str(width), str(height), str(path)], check=True)
            out = subprocess.run([sys.executable, "-c", MEASURE, str(path), repo], check=True, capture_output=True,
                                 text=True).stdout.split()
            size, seconds, grown = int(out[0]), float(out[1]), float(out[2])
            mp = width * height / 1e6
            print(f"| {mode} {fmt} {width}x{height} | {mp:.1f} | {size / 1e6:.2f} | {seconds:.2f} | {grown:.0f} | "
                  f"{grown / mp:.1f} |", flush=True)


if __name__ == "__main__":
    main()
