"""Copy the browser runtime (js/src, without the Node entry) and the demo page (deploy_examples/web)
into exporter/web_assets, the copy `rwkv-export web` ships inside the rwkv_export package.

    python scripts/sync_web_assets.py          # write the copy
    python scripts/sync_web_assets.py --check  # exit 1 naming the first difference (tests/edge runs this)
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "exporter" / "web_assets"
NODE_ONLY = {"node.js"}


def sources() -> dict[str, Path]:
    """Bundle-relative name -> source file."""
    out = {f"rwkv-runtime/{p.name}": p for p in sorted((REPO / "js" / "src").iterdir())
           if p.is_file() and p.name not in NODE_ONLY}
    out.update({f"demo/{n}": REPO / "deploy_examples" / "web" / n for n in ("index.html", "app.js", "serve.py")})
    return out


def differences() -> list[str]:
    want = sources()
    have = {str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*") if p.is_file()} if ASSETS.is_dir() else set()
    diffs = [f"{n}: missing from {ASSETS}" for n in sorted(set(want) - have)]
    diffs += [f"{n}: in {ASSETS} but not in the sources" for n in sorted(have - set(want))]
    diffs += [f"{n}: differs from {want[n].relative_to(REPO)}" for n in sorted(set(want) & have)
              if not filecmp.cmp(want[n], ASSETS / n, shallow=False)]
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the copy is stale")
    args = ap.parse_args(argv)
    if args.check:
        diffs = differences()
        for d in diffs[:20]:
            print(d, file=sys.stderr)
        if diffs:
            print("run: python scripts/sync_web_assets.py", file=sys.stderr)
        return 1 if diffs else 0
    if ASSETS.exists():
        shutil.rmtree(ASSETS)
    for name, src in sources().items():
        (ASSETS / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, ASSETS / name)
    print(f"wrote {ASSETS} ({len(sources())} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
